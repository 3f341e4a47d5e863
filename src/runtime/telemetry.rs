//! The process's own telemetry: log lines and OTLP spans (metrics: [`crate::runtime::metrics`]).
//!
//! - **Logs** go to standard error through `tracing`, as text or one JSON object a line
//!   (`--log-format json`); `RUST_LOG` filters them (default `info`, every target: a line from
//!   any module, whichever room it moves to, reaches the output).
//! - **Spans** are exported over OTLP/HTTP (protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: a run-time switch, so one binary serves both.
//!   Only this crate's spans are exported (any module of it); a server span continues the
//!   `traceparent` its caller sends ([`continue_trace`]). The exporter uses hyper's plain HTTP
//!   client (no TLS stack of its own, nothing built with cmake): point it at a collector in the
//!   cluster, which is where one usually runs.
//!
//! Nothing secret is logged: `OTEL_EXPORTER_OTLP_HEADERS` (which may hold a token) is never
//! printed.
//!
//! **A log line is one line, of bounded length.** The text format writes every field through
//! [`EscapedFields`], which escapes control characters (`\n`, `\r`, NUL, ESC, ...) and the
//! Unicode line and paragraph separators and bidirectional overrides, so a value cannot start
//! a forged line or hide text (the JSON format escapes them itself). Values taken from a request
//! are clipped with [`clipped`] where they are logged, whichever the format.

use std::fmt;
use std::fmt::Write as _;

use axum::http::HeaderMap;
use clap::ValueEnum;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::field::{MakeVisitor, Visit, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The name spans are reported under when `OTEL_SERVICE_NAME` does not say otherwise.
const SERVICE_NAME: &str = env!("CARGO_PKG_NAME");

/// The first segment of every target this crate logs or opens spans under (its module paths).
const CRATE_TARGET: &str = env!("CARGO_CRATE_NAME");

/// The filter without `RUST_LOG`: every target at info, so no module's lines are dropped.
const DEFAULT_FILTER: &str = "info";

/// Characters of a request value kept in a log line: a Kubernetes name is at most 253, a uid
/// 36; past this a value is an attack or a mistake, and its start is enough to find it.
const MAX_LOGGED_CHARS: usize = 256;

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
pub(crate) enum TelemetryError {
    #[error("RUST_LOG: {0}")]
    Filter(String),
    #[error("OTLP exporter (OTEL_EXPORTER_OTLP_*): {0}")]
    Otlp(String),
    #[error("a log subscriber is already installed: {0}")]
    Install(String),
}

/// Flushes exported spans when dropped. Drop it outside the async runtime's worker threads
/// (after `block_on` returns): the flush waits on a task of that runtime.
pub(crate) struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
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
pub(crate) fn init(format: LogFormat) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            EnvFilter::try_new(v).map_err(|e| TelemetryError::Filter(e.to_string()))?
        }
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let provider = if otlp_requested() {
        Some(otlp_provider()?)
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                exported(m.target())
            }))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(log_layer(format, std::io::stderr, ansi))
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Install(e.to_string()))?;
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing::info!("exporting spans over OTLP/HTTP");
    }
    Ok(TelemetryGuard { provider })
}

/// The log lines, in `format`, to `writer`.
fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .fmt_fields(EscapedFields)
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    }
}

/// A value taken from a request, as logged: its first [`MAX_LOGGED_CHARS`] characters, then
/// `…` if there were more.
pub(crate) fn clipped(value: &str) -> Clipped<'_> {
    Clipped(value)
}

/// See [`clipped`].
pub(crate) struct Clipped<'a>(&'a str);

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(MAX_LOGGED_CHARS) {
            Some((end, _)) => write!(f, "{}…", &self.0[..end]),
            None => f.write_str(self.0),
        }
    }
}

/// The text format's fields (`name=value`, the message bare), each written through [`Escape`].
struct EscapedFields;

impl<'w> MakeVisitor<Writer<'w>> for EscapedFields {
    type Visitor = EscapingVisitor<'w>;

    fn make_visitor(&self, writer: Writer<'w>) -> EscapingVisitor<'w> {
        EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        }
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    fn field(&mut self, field: &tracing::field::Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = match field.name() {
            "message" => write!(Escape(&mut self.writer), "{separator}{value}"),
            name => write!(self.writer, "{separator}{name}=")
                .and_then(|()| write!(Escape(&mut self.writer), "{value}")),
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        // Quoted, as tracing's own text format writes strings.
        self.field(field, format_args!("{value:?}"));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for EscapingVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapingVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Writes through to `W` with every character that could end, hide or reorder a line escaped
/// as `\n`, `\r`, `\t`, `\0` or `\u{…}`.
struct Escape<W>(W);

impl<W: fmt::Write> fmt::Write for Escape<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                '\0' => self.0.write_str("\\0")?,
                c => write!(self.0, "\\u{{{:04x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Control characters (C0, DEL, C1), the line and paragraph separators (U+2028, U+2029), and
/// the bidirectional embeddings, overrides and isolates (U+202A..U+202E, U+2066..U+2069).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Whether a span is exported: this crate's, from any module (libraries' debug spans would be
/// noise and cost). Matched on the whole first segment, so a module that moves stays in.
fn exported(target: &str) -> bool {
    target.split("::").next() == Some(CRATE_TARGET)
}

fn otlp_requested() -> bool {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    OTLP_ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// The first of `vars` that is set and not empty.
fn env_first(vars: &[&str]) -> Option<String> {
    vars.iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// The server's own spans go out through the same OTLP client as the run spans: gRPC or
/// HTTP/protobuf, TLS or in the clear, from the standard variables: `OTEL_EXPORTER_OTLP_[TRACES_]`
/// `ENDPOINT`, `PROTOCOL` (default `http/protobuf`, the SDKs' default), `CERTIFICATE` (a CA file
/// trusted besides the platform's roots) and `TIMEOUT` (milliseconds).
fn otlp_provider() -> Result<SdkTracerProvider, TelemetryError> {
    use crate::otlp::{Client, Config, Settings, SpanExporter, traces_url};
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    let otlp = |e: String| TelemetryError::Otlp(e);
    let protocol = env_first(&[
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ])
    .unwrap_or_else(|| "http/protobuf".to_owned());
    // A signal's own endpoint is used as given; the generic one gets the traces path over HTTP.
    let endpoint = match env_first(&["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]) {
        Some(traces) => traces,
        None => {
            let base = env_first(&["OTEL_EXPORTER_OTLP_ENDPOINT"]).unwrap_or_default();
            match protocol.as_str() {
                "grpc" => base,
                _ => traces_url(&base),
            }
        }
    };
    let mut settings = Settings {
        endpoint,
        protocol,
        ca_file: env_first(&[
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ])
        .map(Into::into),
        token: None,
        ..Settings::default()
    };
    if let Some(ms) = env_first(&[
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]) {
        let ms: u64 = ms
            .trim()
            .parse()
            .map_err(|_| otlp("OTEL_EXPORTER_OTLP_TIMEOUT: expected milliseconds".to_owned()))?;
        settings.timeout = std::time::Duration::from_millis(ms);
    }
    let config = Config::new(&settings).map_err(|e| otlp(e.to_string()))?;
    let client = Client::new(config).map_err(|e| otlp(e.to_string()))?;
    let exporter = SpanExporter::new(client).map_err(|e| otlp(e.to_string()))?;
    // The async batch processor runs on our Tokio runtime, which the client's sockets need.
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

/// Makes `span` a child of the caller's `traceparent` header, when there is one.
pub(crate) fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
    let _ = span.set_parent(parent);
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

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use kube::core::DynamicObject;
    use kube::runtime::watcher::Event;

    use super::*;

    /// What the log layer wrote, shared with the test.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    /// The subscriber `init` installs without `RUST_LOG`, writing JSON lines to a buffer.
    pub(crate) fn captured(
        format: LogFormat,
    ) -> (impl tracing::Subscriber + Send + Sync, Captured) {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(DEFAULT_FILTER))
            .with(log_layer(format, out.clone(), false));
        (subscriber, out)
    }

    #[test]
    fn a_line_logged_in_another_room_reaches_the_output() {
        let (subscriber, out) = captured(LogFormat::Json);
        let policy: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "lightstep-tekton.io/v1alpha1",
            "kind": "TracingPolicy",
            "metadata": {"name": "team-a", "generation": 1},
            "spec": {"profile": "lightstep"},
        }))
        .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            // The cluster room logs the new order of the TracingPolicies it caches.
            crate::cluster::Caches::new().apply_policy_event(Event::Apply(policy));
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let target = line["target"].as_str().unwrap_or_default();
        assert!(
            target.starts_with(concat!(env!("CARGO_CRATE_NAME"), "::cluster")),
            "{text}"
        );
        assert_eq!(line["level"], "INFO", "{text}");
    }

    #[test]
    fn spans_of_every_module_of_this_crate_are_exported_and_no_others() {
        assert!(exported(module_path!()));
        assert!(exported(concat!(
            env!("CARGO_CRATE_NAME"),
            "::export::queue"
        )));
        assert!(exported(env!("CARGO_CRATE_NAME")));
        assert!(!exported("hyper_util::client"));
        assert!(!exported(concat!(env!("CARGO_CRATE_NAME"), "_extras::x")));
    }
}
