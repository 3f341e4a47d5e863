//! An OTLP/HTTP trace receiver for tests of the exporter: records each request it accepted
//! (decoded with the OpenTelemetry proto types) and when it answered, answers 503 while told
//! to fail (or the status it is told to answer), holds each request unanswered while told to
//! stall, and can report spans dropped (OTLP partial success).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;

/// One accepted request.
#[derive(Debug, Clone)]
pub struct Received {
    pub request: ExportTraceServiceRequest,
    /// The token header's value, if any.
    pub token: Option<String>,
    /// Just before the answer was sent.
    pub answered: Instant,
}

impl Received {
    /// The hex trace ids of its spans, deduplicated.
    pub fn trace_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.trace_id.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The root span's `cicd.pipeline.run.id` or `cicd.pipeline.task.run.id`: the run's uid.
    pub fn run_uids(&self) -> Vec<String> {
        let mut uids: Vec<String> = self
            .request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .flat_map(|s| &s.attributes)
            .filter(|a| a.key == "cicd.pipeline.run.id")
            .filter_map(|a| match a.value.as_ref()?.value.as_ref()? {
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                    Some(s.clone())
                }
                _ => None,
            })
            .collect();
        uids.sort();
        uids.dedup();
        uids
    }

    pub fn span_count(&self) -> usize {
        self.request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum()
    }
}

/// The receiver; cheap to clone.
#[derive(Clone, Default)]
pub struct Receiver {
    pub addr: Option<SocketAddr>,
    received: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    stalling: Arc<AtomicBool>,
    stalled: Arc<AtomicUsize>,
    /// A status to answer every request with instead (0: none).
    status: Arc<AtomicU16>,
    /// Spans each accepted request reports as rejected (partial success).
    drop_spans: Arc<AtomicI64>,
}

impl Receiver {
    /// Serves `POST /v1/traces` on 127.0.0.1 until the runtime ends.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            addr: Some(listener.local_addr().unwrap()),
            ..Receiver::default()
        };
        let r = receiver.clone();
        let app = Router::new().route(
            "/v1/traces",
            post(move |headers: HeaderMap, body: Bytes| {
                let r = r.clone();
                async move {
                    if r.stalling.load(Ordering::SeqCst) {
                        r.stalled.fetch_add(1, Ordering::SeqCst);
                        while r.stalling.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                    let status = r.status.load(Ordering::SeqCst);
                    if status != 0 {
                        r.refused.fetch_add(1, Ordering::SeqCst);
                        return (StatusCode::from_u16(status).unwrap(), Vec::new());
                    }
                    if r.failing.load(Ordering::SeqCst) {
                        r.refused.fetch_add(1, Ordering::SeqCst);
                        return (StatusCode::SERVICE_UNAVAILABLE, Vec::new());
                    }
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return (StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let token = headers
                        .get("lightstep-access-token")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    r.received.lock().unwrap().push(Received {
                        request,
                        token,
                        answered: Instant::now(),
                    });
                    let rejected_spans = r.drop_spans.load(Ordering::SeqCst);
                    let reply = ExportTraceServiceResponse {
                        partial_success: (rejected_spans > 0).then(|| ExportTracePartialSuccess {
                            rejected_spans,
                            error_message: "too many attributes".into(),
                        }),
                    };
                    (StatusCode::OK, reply.encode_to_vec())
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    /// The endpoint for a policy: `http://127.0.0.1:<port>` (the client appends `/v1/traces`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The trace ids of each request from the `from`th on, with when it was answered (cheaper
    /// than [`Receiver::received`] when polled often).
    pub fn traces_from(&self, from: usize) -> Vec<(Vec<String>, Instant)> {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .skip(from)
            .map(|r| (r.trace_ids(), r.answered))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Answer 503 to everything while `failing`.
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Hold every request unanswered while `stalling` (a backend that hangs).
    pub fn stall(&self, stalling: bool) {
        self.stalling.store(stalling, Ordering::SeqCst);
    }

    /// Requests that were held by [`Receiver::stall`].
    pub fn stalled(&self) -> usize {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Answer every request with `status` (0: answer normally again).
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Report `spans` of each accepted request as rejected (OTLP partial success).
    pub fn drop_spans(&self, spans: i64) {
        self.drop_spans.store(spans, Ordering::SeqCst);
    }

    /// Requests answered 503 (or the status told).
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}
