//! The server's own telemetry: log lines, Prometheus metrics and OTLP spans.
//!
//! - **Logs** go to standard error through `tracing`, as text or one JSON object a line
//!   (`--log-format json`); `RUST_LOG` filters them (default `info`). Each admission gets exactly
//!   one line ([`record_admission`]) with uid, namespace, pod, mode, decision and duration.
//! - **Metrics** live in a [`Metrics`] registry owned by the server (not a global, so tests can
//!   run several servers side by side) and are served as OpenMetrics text on a separate
//!   plain-HTTP port.
//! - **Spans** are exported over OTLP/HTTP (protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: a run-time switch, so one binary serves both.
//!   An admission span continues the `traceparent` the API server sends when its own tracing is
//!   on. The exporter uses hyper's plain HTTP client (no TLS stack of its own, nothing built with
//!   cmake): point it at a collector in the cluster, which is where one usually runs.
//!
//! Nothing secret is logged or counted: the reply's patch refers to the token Secret by name,
//! and `OTEL_EXPORTER_OTLP_HEADERS` (which may hold a token) is never printed.

use std::time::Duration;

use axum::http::HeaderMap;
use clap::ValueEnum;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::admission::decide::Mode;
use crate::admission::{Outcome, Reply};
use crate::policy::selection::Fallback;

/// The name spans are reported under when `OTEL_SERVICE_NAME` does not say otherwise.
const SERVICE_NAME: &str = env!("CARGO_PKG_NAME");

/// Every metric name starts with this, so dashboards can find them all.
const METRIC_PREFIX: &str = "lightstep_tekton_webhook";

/// The variables that switch OTLP export on (the OpenTelemetry SDK specification's names).
const OTLP_ENDPOINT_VARS: &[&str] = &[
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log pipelines.
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("RUST_LOG: {0}")]
    Filter(String),
    #[error("OTLP exporter (OTEL_EXPORTER_OTLP_*): {0}")]
    Otlp(String),
    #[error("a log subscriber is already installed: {0}")]
    Install(String),
}

/// Flushes exported spans when dropped. Drop it outside the async runtime's worker threads
/// (after `block_on` returns): the flush waits on a task of that runtime.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing OTLP spans: {e}");
        }
    }
}

/// Installs the log subscriber and, when the OTLP variables are set, the span exporter.
/// Call it once, inside the Tokio runtime (the exporter runs as a task of it).
pub fn init(format: LogFormat) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            EnvFilter::try_new(v).map_err(|e| TelemetryError::Filter(e.to_string()))?
        }
        _ => EnvFilter::new("info"),
    };
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let provider = if otlp_requested() {
        Some(otlp_provider()?)
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                // Only the server's own spans: libraries' debug spans would be noise and cost.
                m.target().starts_with(env!("CARGO_CRATE_NAME"))
            }))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Install(e.to_string()))?;
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing::info!("exporting spans over OTLP/HTTP");
    }
    Ok(TelemetryGuard { provider })
}

fn otlp_requested() -> bool {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    OTLP_ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

fn otlp_provider() -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    // Only OTLP/HTTP with protobuf is built in (no gRPC stack); say so rather than fail later.
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
            && v != "http/protobuf"
        {
            eprintln!("warning: {var}={v} ignored: this server exports spans over http/protobuf");
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
    // The async batch processor runs on our Tokio runtime, which hyper's client needs.
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

/// The span of one admission, continuing the caller's `traceparent` when there is one.
pub fn admission_span(mode: Mode, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "admission",
        otel.kind = "server",
        mode = mode.as_str(),
        uid = tracing::field::Empty,
        decision = tracing::field::Empty,
    );
    if headers.contains_key("traceparent") {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
        let _ = span.set_parent(parent);
    }
    span
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
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
pub enum Rejection {
    /// HTTP 400: not an AdmissionReview v1, malformed JSON, empty body.
    BadRequest,
    /// HTTP 413: over the body limit.
    TooLarge,
    /// HTTP 408: the body did not arrive in time, or the connection broke while sending it.
    BodyTimeout,
    /// HTTP 500: deciding panicked (a bug; the server kept serving).
    Internal,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BadRequest => "bad-request",
            Rejection::TooLarge => "too-large",
            Rejection::BodyTimeout => "body-timeout",
            Rejection::Internal => "internal",
        }
    }
}

/// Which reloadable file a reload was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadKind {
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

/// The server's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
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

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(METRIC_PREFIX);
        let admissions = Family::<ModeOutcome, Counter>::default();
        registry.register(
            "admissions",
            "AdmissionReviews answered, by mode (inject, enforce) and outcome (patched, skipped, denied, allowed-on-error, audited)",
            admissions.clone(),
        );
        let skips = Family::<ModeReason, Counter>::default();
        registry.register(
            "admission_skips",
            "Pods left untouched, by reason",
            skips.clone(),
        );
        let warnings = Family::<ModeLabel, Counter>::default();
        registry.register(
            "admission_warnings",
            "Warnings returned to the users who created pods",
            warnings.clone(),
        );
        // 256 B to 512 KiB: a few env vars per step up to a 40-step pod's patch, doubling.
        let patch_bytes: HistogramFamily<ModeLabel> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(256.0, 2.0, 12)));
        registry.register(
            "admission_patch_bytes",
            "Size of the JSON Patch returned (before base64), patched pods only",
            patch_bytes.clone(),
        );
        // 50 µs to about 0.8 s, doubling: a review takes tens of microseconds; the API server
        // gives up after its webhook timeout (10 s by default, 30 s at most).
        let duration: HistogramFamily<ModeLabel> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.00005, 2.0, 15)));
        registry.register(
            "admission_duration_seconds",
            "Time to decide one AdmissionReview, from a complete body to the reply",
            duration.clone(),
        );
        let rejections = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "http_rejections",
            "Requests answered without an AdmissionReview (400, 408, 413, 500), by reason",
            rejections.clone(),
        );
        let handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            handshake_failures.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            connections.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use, in seconds since the Unix epoch",
            cert_expiry.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "reloads",
            "Reloads of the certificate (file=tls) or policy (file=policy) files; result=refused keeps the previous one",
            reloads.clone(),
        );
        Metrics {
            registry,
            admissions,
            skips,
            warnings,
            patch_bytes,
            duration,
            rejections,
            handshake_failures,
            connections,
            cert_expiry,
            reloads,
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode to a String");
        out
    }

    pub fn set_certificate_expiry(&self, not_after: i64) {
        self.cert_expiry.set(not_after);
    }

    pub fn handshake_failed(&self) {
        self.handshake_failures.inc();
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    pub fn reloaded(&self, kind: ReloadKind, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads
            .get_or_create(&ReloadLabels {
                file: kind.as_str(),
                result,
            })
            .inc();
    }
}

/// The one log line and the metrics of one answered AdmissionReview.
pub fn record_admission(metrics: &Metrics, reply: &Reply, elapsed: Duration) {
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
                target: "lightstep_tekton_webhook::admission",
                uid = %reply.uid,
                namespace = %reply.namespace,
                pod = %reply.pod,
                mode = %mode,
                decision = %decision,
                duration_ms,
                policy = (!reply.policy.is_empty()).then_some(reply.policy.as_str()),
                policy_fallback = reply.fallback.filter(|f| *f != Fallback::NotWatching).map(Fallback::as_str),
                skip_reason = reply.outcome.skip_reason(),
                warnings,
                patch_bytes = (reply.patch_bytes > 0).then_some(reply.patch_bytes),
                error = reply.error.as_deref(),
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

/// The log line and metric of a request answered without an AdmissionReview.
pub fn record_rejection(metrics: &Metrics, mode: Mode, rejection: Rejection, detail: &str) {
    metrics
        .rejections
        .get_or_create(&ReasonLabel {
            reason: rejection.as_str(),
        })
        .inc();
    tracing::warn!(
        target: "lightstep_tekton_webhook::admission",
        mode = %mode.as_str(),
        rejected = %rejection.as_str(),
        reason = detail,
        "request refused"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_the_prefix() {
        let m = Metrics::new();
        m.reloaded(ReloadKind::Tls, false);
        m.set_certificate_expiry(1_900_000_000);
        let text = m.encode();
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
