//! The OTLP client against an in-test receiver on 127.0.0.1: gRPC (tonic's generated server)
//! and HTTP/protobuf (a hyper handler), each plain and over TLS with a CA generated here and
//! trusted through the CA-file option. The receiver decodes every request with the
//! OpenTelemetry proto types and answers from a script, so retries, timeouts and token
//! rotation are observed from the receiver's side.

mod support {
    pub mod tmp;
}

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use lightstep_tekton_webhook::otlp::{
    Cause, Client, Config, ExportError, RetryPolicy, Settings, SpanExporter, TokenSource,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message as _;
use support::tmp::TempDir;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

const TOKEN_HEADER: &str = "lightstep-access-token";

/// Long enough for a loaded 2-core machine; a hang (an uncapped Retry-After, a missed timeout)
/// fails the test instead of stalling it.
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- the receiver

#[derive(Debug, Clone)]
enum Reply {
    Ok,
    Http(u16, Option<&'static str>),
    Grpc(tonic::Code, Option<Duration>),
    /// Echoes the token it received in an error message, like a careless receiver.
    EchoToken,
    Hang,
    /// Accepts the request but reports this many spans rejected (OTLP partial success).
    Partial(i64),
}

#[derive(Debug)]
struct Seen {
    token: Option<String>,
    request: ExportTraceServiceRequest,
}

#[derive(Clone, Default)]
struct Receiver {
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Receiver {
    fn scripted(replies: &[Reply]) -> Self {
        let receiver = Self::default();
        receiver
            .script
            .lock()
            .unwrap()
            .extend(replies.iter().cloned());
        receiver
    }

    /// Records the request and picks the next reply (success once the script runs out).
    fn take(&self, token: Option<String>, request: ExportTraceServiceRequest) -> Reply {
        self.seen.lock().unwrap().push(Seen { token, request });
        self.script.lock().unwrap().pop_front().unwrap_or(Reply::Ok)
    }

    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn tokens(&self) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.token.clone())
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let token = request
            .metadata()
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match self.take(token.clone(), request.into_inner()) {
            Reply::Ok => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Reply::Grpc(code, None) => Err(tonic::Status::new(code, "scripted")),
            Reply::Grpc(code, Some(delay)) => Err(tonic::Status::with_details(
                code,
                "scripted, with RetryInfo",
                retry_info(delay).into(),
            )),
            Reply::EchoToken => Err(tonic::Status::invalid_argument(format!(
                "bad token {}",
                token.unwrap_or_default()
            ))),
            Reply::Hang => std::future::pending().await,
            Reply::Partial(rejected) => Ok(tonic::Response::new(partial(rejected))),
            Reply::Http(..) => Err(tonic::Status::internal("HTTP reply scripted for gRPC")),
        }
    }
}

async fn http_export(
    receiver: Receiver,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, body: Vec<u8>| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
    };
    let is_protobuf = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/x-protobuf");
    if request.method() != hyper::Method::POST || request.uri().path() != "/v1/traces" {
        return Ok(reply(404, b"wrong method or path".to_vec()));
    }
    if !is_protobuf {
        return Ok(reply(415, b"expected application/x-protobuf".to_vec()));
    }
    let token = request
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(body) = request.into_body().collect().await else {
        return Ok(reply(400, b"body".to_vec()));
    };
    let Ok(decoded) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return Ok(reply(400, b"not an ExportTraceServiceRequest".to_vec()));
    };
    Ok(match receiver.take(token.clone(), decoded) {
        Reply::Ok => reply(200, ExportTraceServiceResponse::default().encode_to_vec()),
        Reply::Http(status, retry_after) => {
            let mut response = reply(status, b"scripted".to_vec());
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from_static(seconds),
                );
            }
            response
        }
        Reply::EchoToken => reply(
            400,
            format!("bad token {}", token.unwrap_or_default()).into_bytes(),
        ),
        Reply::Hang => std::future::pending().await,
        Reply::Partial(rejected) => reply(200, partial(rejected).encode_to_vec()),
        Reply::Grpc(..) => reply(500, b"gRPC reply scripted for HTTP".to_vec()),
    })
}

fn partial(rejected_spans: i64) -> ExportTraceServiceResponse {
    ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess {
            rejected_spans,
            error_message: "too many attributes".to_owned(),
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Wire {
    Grpc,
    Http,
}

impl Wire {
    fn protocol(self) -> &'static str {
        match self {
            Wire::Grpc => "grpc",
            Wire::Http => "http/protobuf",
        }
    }
}

/// Starts a receiver and returns its endpoint (a base URL; the client adds `/v1/traces` for
/// HTTP).
async fn serve(wire: Wire, tls: Option<&Pki>, receiver: Receiver) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tls.map(|pki| pki.acceptor(wire));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let receiver = receiver.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        // A client that rejects our certificate ends the handshake; that is a
                        // test outcome, not a receiver failure.
                        if let Ok(tls) = acceptor.accept(stream).await {
                            connection(wire, tls, receiver).await;
                        }
                    }
                    None => connection(wire, stream, receiver).await,
                }
            });
        }
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://127.0.0.1:{port}")
}

async fn connection<IO>(wire: Wire, io: IO, receiver: Receiver)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    // Connection errors (a client that timed out and hung up) end the connection only.
    let _ = match wire {
        Wire::Grpc => {
            let service = TowerToHyperService::new(TraceServiceServer::new(receiver));
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await
        }
        Wire::Http => {
            let service =
                hyper::service::service_fn(move |request| http_export(receiver.clone(), request));
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
        }
    };
}

// ---------------------------------------------------------------- certificates and files

/// A CA and a certificate for 127.0.0.1 signed by it; the CA's PEM is written to a file for
/// the client's `ca_file`.
struct Pki {
    ca_file: PathBuf,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: Vec<u8>,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let ca_file = dir.join(format!("ca-{}.pem", fastrand::u64(..)));
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        Self {
            ca_file,
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    fn acceptor(&self, wire: Wire) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key.clone().into());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .unwrap();
        config.alpn_protocols = match wire {
            Wire::Grpc => vec![b"h2".to_vec()],
            Wire::Http => vec![b"http/1.1".to_vec()],
        };
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// Writes the token file the way a Secret volume changes: a new file renamed over the old.
fn write_token(path: &Path, value: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, value).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

// ---------------------------------------------------------------- client helpers

/// Retries fast enough for tests; the numbers only need to keep waits far below [`DEADLINE`].
fn quick_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        max_server_delay: Duration::from_millis(50),
    }
}

fn settings(wire: Wire, endpoint: &str) -> Settings {
    Settings {
        endpoint: endpoint.to_owned(),
        protocol: wire.protocol().to_owned(),
        timeout: Duration::from_secs(10),
        retry: quick_retry(3),
        ..Settings::default()
    }
}

fn connect(settings: &Settings) -> Client {
    logs();
    Client::new(Config::new(settings).unwrap()).unwrap()
}

fn request(name: &str) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![0x4b; 16],
                    span_id: vec![0x0c; 8],
                    name: name.to_owned(),
                    start_time_unix_nano: 1_700_000_000_000_000_000,
                    end_time_unix_nano: 1_700_000_001_000_000_000,
                    ..Span::default()
                }],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

async fn export(client: &Client, name: &str) -> Result<u32, ExportError> {
    tokio::time::timeout(DEADLINE, client.export(request(name)))
        .await
        .expect("export finished within the test deadline")
        .map(|delivery| delivery.attempts)
}

fn span_names(receiver: &Receiver) -> Vec<String> {
    let seen = receiver.seen.lock().unwrap();
    seen.iter()
        .flat_map(|s| &s.request.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .map(|s| s.name.clone())
        .collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn delivers_over_grpc_and_http_plain_and_tls_with_the_token() {
    let dir = TempDir::new("deliver");
    let pki = Pki::new(&dir.0);
    let token_file = dir.0.join("token");
    write_token(&token_file, "tok-SECRET-plain-0001\n");
    for wire in [Wire::Grpc, Wire::Http] {
        for tls in [None, Some(&pki)] {
            let receiver = Receiver::default();
            let endpoint = serve(wire, tls, receiver.clone()).await;
            let client = connect(&Settings {
                ca_file: tls.map(|pki| pki.ca_file.clone()),
                token: Some(TokenSource::File(token_file.clone())),
                ..settings(wire, &endpoint)
            });
            let attempts = export(&client, "build").await.unwrap();
            assert_eq!(attempts, 1, "{wire:?} {endpoint}");
            assert_eq!(span_names(&receiver), ["build"], "{wire:?} {endpoint}");
            let seen = receiver.seen.lock().unwrap();
            let span = &seen[0].request.resource_spans[0].scope_spans[0].spans[0];
            assert_eq!(span.trace_id, vec![0x4b; 16]);
            assert_eq!(seen[0].token.as_deref(), Some("tok-SECRET-plain-0001"));
        }
    }
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_permanent_tls_failure() {
    let dir = TempDir::new("untrusted");
    let server_pki = Pki::new(&dir.0);
    let other_ca = Pki::new(&dir.0);
    for wire in [Wire::Grpc, Wire::Http] {
        let receiver = Receiver::default();
        let endpoint = serve(wire, Some(&server_pki), receiver.clone()).await;
        let client = connect(&Settings {
            ca_file: Some(other_ca.ca_file.clone()),
            ..settings(wire, &endpoint)
        });
        let error = export(&client, "build").await.unwrap_err();
        assert_eq!(error.cause(), Cause::Tls, "{wire:?}: {error}");
        assert!(!error.is_retryable(), "{wire:?}: {error}");
        assert_eq!(error.attempts(), 1, "{wire:?}: {error}");
        assert_eq!(receiver.attempts(), 0);
    }
}

#[tokio::test]
async fn a_rewritten_token_file_is_sent_on_the_next_export() {
    let dir = TempDir::new("rotate");
    let token_file = dir.0.join("token");
    for wire in [Wire::Grpc, Wire::Http] {
        write_token(&token_file, "tok-SECRET-before\n");
        let receiver = Receiver::default();
        let endpoint = serve(wire, None, receiver.clone()).await;
        let client = connect(&Settings {
            token: Some(TokenSource::File(token_file.clone())),
            ..settings(wire, &endpoint)
        });
        export(&client, "one").await.unwrap();
        write_token(&token_file, "tok-SECRET-after\n");
        export(&client, "two").await.unwrap();
        // A bad rewrite (a half-written file) keeps the last good token.
        write_token(&token_file, "tok SECRET broken\u{7}\n");
        export(&client, "three").await.unwrap();
        assert_eq!(
            receiver.tokens(),
            [
                Some("tok-SECRET-before".to_owned()),
                Some("tok-SECRET-after".to_owned()),
                Some("tok-SECRET-after".to_owned()),
            ],
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn the_token_never_reaches_errors_or_logs() {
    let logs = logs();
    let dir = TempDir::new("secret");
    let pki = Pki::new(&dir.0);
    let token_file = dir.0.join("token");
    let secrets = ["tok-SECRET-first-7f3a", "tok-SECRET-second-91bc"];
    let before = logs.text().len();
    for wire in [Wire::Grpc, Wire::Http] {
        let retry = match wire {
            Wire::Grpc => Reply::Grpc(tonic::Code::Unavailable, None),
            Wire::Http => Reply::Http(503, None),
        };
        let receiver = Receiver::scripted(&[retry, Reply::Ok, Reply::Ok, Reply::EchoToken]);
        let endpoint = serve(wire, Some(&pki), receiver.clone()).await;
        write_token(&token_file, &format!("{}\n", secrets[0]));
        let client = connect(&Settings {
            ca_file: Some(pki.ca_file.clone()),
            token: Some(TokenSource::File(token_file.clone())),
            ..settings(wire, &endpoint)
        });
        assert_eq!(export(&client, "retried").await.unwrap(), 2);
        write_token(&token_file, &format!("{}\n", secrets[1]));
        export(&client, "rotated").await.unwrap();
        let error = export(&client, "echoed").await.unwrap_err();
        let shown = format!("{error} {error:?}");
        assert!(shown.contains("<token>"), "{shown}");
        for secret in secrets {
            assert!(
                !shown.contains(secret),
                "{wire:?} error shows the token: {shown}"
            );
        }
        assert_eq!(
            receiver.tokens().last().unwrap().as_deref(),
            Some(secrets[1])
        );
    }
    let text = logs.text();
    // The capture worked: this test's retries and rotation were logged.
    assert!(text[before..].contains("retrying"));
    assert!(text[before..].contains("OTLP token changed"));
    // Every token in this binary carries the marker, so this also covers the other tests'
    // logs written so far.
    assert!(!text.contains(SECRET_MARKER), "a log line shows a token");
}

/// Part of every token value the tests use, so one search finds any leak.
const SECRET_MARKER: &str = "SECRET";

/// The log capture for the whole test binary: one global subscriber at TRACE (the client's,
/// hyper's, h2's, tonic's and rustls's events), installed once. Global rather than per test,
/// because tracing caches per-callsite interest across threads and a thread-local subscriber
/// can miss events that another test's thread registered first.
fn logs() -> LogBuffer {
    static LOGS: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("only this test installs one");
        logs
    })
    .clone()
}

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn retryable_statuses_are_retried_then_succeed() {
    let cases = [
        (Wire::Http, Reply::Http(503, None)),
        (Wire::Http, Reply::Http(429, None)),
        (Wire::Http, Reply::Http(502, None)),
        (Wire::Grpc, Reply::Grpc(tonic::Code::Unavailable, None)),
        (Wire::Grpc, Reply::Grpc(tonic::Code::Aborted, None)),
        (
            Wire::Grpc,
            Reply::Grpc(
                tonic::Code::ResourceExhausted,
                Some(Duration::from_millis(5)),
            ),
        ),
    ];
    for (wire, failure) in cases {
        let receiver = Receiver::scripted(&[failure.clone(), failure.clone(), Reply::Ok]);
        let endpoint = serve(wire, None, receiver.clone()).await;
        let client = connect(&settings(wire, &endpoint));
        let attempts = export(&client, "build").await;
        assert_eq!(attempts, Ok(3), "{failure:?}");
        assert_eq!(receiver.attempts(), 3, "{failure:?}");
    }
}

#[tokio::test]
async fn permanent_statuses_are_not_retried() {
    let cases = [
        (Wire::Http, Reply::Http(400, None), Cause::Rejected),
        (Wire::Http, Reply::Http(401, None), Cause::Unauthenticated),
        (Wire::Http, Reply::Http(500, None), Cause::Server),
        (
            Wire::Grpc,
            Reply::Grpc(tonic::Code::InvalidArgument, None),
            Cause::Rejected,
        ),
        (
            Wire::Grpc,
            Reply::Grpc(tonic::Code::Unauthenticated, None),
            Cause::Unauthenticated,
        ),
        // Without RetryInfo, RESOURCE_EXHAUSTED means "never", not "later".
        (
            Wire::Grpc,
            Reply::Grpc(tonic::Code::ResourceExhausted, None),
            Cause::Throttled,
        ),
    ];
    for (wire, failure, cause) in cases {
        let receiver = Receiver::scripted(&[failure.clone(), Reply::Ok]);
        let endpoint = serve(wire, None, receiver.clone()).await;
        let client = connect(&settings(wire, &endpoint));
        let error = export(&client, "build").await.unwrap_err();
        assert_eq!(error.cause(), cause, "{failure:?}: {error}");
        assert!(!error.is_retryable(), "{failure:?}: {error}");
        assert_eq!(error.attempts(), 1, "{failure:?}: {error}");
        assert_eq!(receiver.attempts(), 1, "{failure:?}");
    }
}

#[tokio::test]
async fn retries_stop_at_max_attempts() {
    for (wire, failure) in [
        (Wire::Http, Reply::Http(503, None)),
        (Wire::Grpc, Reply::Grpc(tonic::Code::Unavailable, None)),
    ] {
        let receiver = Receiver::scripted(&vec![failure.clone(); 10]);
        let endpoint = serve(wire, None, receiver.clone()).await;
        let client = connect(&settings(wire, &endpoint));
        let error = export(&client, "build").await.unwrap_err();
        assert_eq!(error.cause(), Cause::Unavailable, "{error}");
        assert!(error.is_retryable(), "{error}");
        assert_eq!(error.attempts(), 3, "{error}");
        assert_eq!(receiver.attempts(), 3, "{failure:?}");
    }
}

#[tokio::test]
async fn retry_after_is_honoured_but_capped() {
    // An hour-long Retry-After would outlast DEADLINE if it were not cut to max_server_delay.
    let receiver = Receiver::scripted(&[Reply::Http(429, Some("3600")), Reply::Ok]);
    let endpoint = serve(Wire::Http, None, receiver.clone()).await;
    let client = connect(&settings(Wire::Http, &endpoint));
    assert_eq!(export(&client, "build").await, Ok(2));
    assert_eq!(receiver.attempts(), 2);

    // A Retry-After on a permanent status does not make it retryable.
    let receiver = Receiver::scripted(&[Reply::Http(400, Some("1")), Reply::Ok]);
    let endpoint = serve(Wire::Http, None, receiver.clone()).await;
    let client = connect(&settings(Wire::Http, &endpoint));
    assert_eq!(export(&client, "build").await.unwrap_err().attempts(), 1);
    assert_eq!(receiver.attempts(), 1);
}

#[tokio::test]
async fn a_receiver_that_never_answers_hits_the_attempt_timeout() {
    for wire in [Wire::Grpc, Wire::Http] {
        let receiver = Receiver::scripted(&[Reply::Hang, Reply::Hang, Reply::Hang]);
        let endpoint = serve(wire, None, receiver.clone()).await;
        let client = connect(&Settings {
            timeout: Duration::from_millis(200),
            retry: quick_retry(2),
            ..settings(wire, &endpoint)
        });
        let error = export(&client, "build").await.unwrap_err();
        assert_eq!(error.cause(), Cause::Timeout, "{wire:?}: {error}");
        assert!(error.is_retryable(), "{wire:?}: {error}");
        assert_eq!(error.attempts(), 2, "{wire:?}: {error}");
        assert_eq!(receiver.attempts(), 2, "{wire:?}");
    }
}

#[tokio::test]
async fn a_partial_success_is_delivered_with_the_rejected_count() {
    for wire in [Wire::Grpc, Wire::Http] {
        let receiver = Receiver::scripted(&[Reply::Partial(2)]);
        let endpoint = serve(wire, None, receiver.clone()).await;
        let client = connect(&settings(wire, &endpoint));
        let delivery = tokio::time::timeout(DEADLINE, client.export(request("build")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.rejected_spans, 2, "{wire:?}");
        assert_eq!(delivery.attempts, 1, "{wire:?}");
        assert_eq!(receiver.attempts(), 1, "{wire:?}");
    }
}

#[tokio::test]
async fn a_closed_port_is_a_retryable_transport_failure() {
    // Bind and drop to find a port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for wire in [Wire::Grpc, Wire::Http] {
        let client = connect(&settings(wire, &format!("http://127.0.0.1:{port}")));
        let error = export(&client, "build").await.unwrap_err();
        assert_eq!(error.cause(), Cause::Transport, "{wire:?}: {error}");
        assert!(error.is_retryable(), "{wire:?}: {error}");
        assert_eq!(error.attempts(), 3, "{wire:?}: {error}");
    }
}

#[tokio::test]
async fn the_sdk_exporter_sends_the_servers_own_spans() {
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    let dir = TempDir::new("sdk");
    let pki = Pki::new(&dir.0);
    let receiver = Receiver::default();
    let endpoint = serve(Wire::Grpc, Some(&pki), receiver.clone()).await;
    let client = connect(&Settings {
        ca_file: Some(pki.ca_file.clone()),
        ..settings(Wire::Grpc, &endpoint)
    });
    // The default batch processor exports from its own thread, outside the runtime.
    let provider = SdkTracerProvider::builder()
        .with_resource(
            Resource::builder_empty()
                .with_service_name("otlp-test-service")
                .build(),
        )
        .with_batch_exporter(SpanExporter::new(client).unwrap())
        .build();
    provider.tracer("otlp-test").in_span("admission", |_| {});
    let flushed = provider.clone();
    tokio::task::spawn_blocking(move || flushed.force_flush())
        .await
        .unwrap()
        .unwrap();
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .unwrap()
        .unwrap();

    assert_eq!(span_names(&receiver), ["admission"]);
    let seen = receiver.seen.lock().unwrap();
    let resource = seen[0].request.resource_spans[0].resource.as_ref().unwrap();
    let service = resource
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref()?.value.as_ref());
    assert_eq!(
        service,
        Some(&Value::StringValue("otlp-test-service".to_owned()))
    );
}

#[tokio::test]
async fn the_otlp_json_form_is_available_to_callers() {
    let json = serde_json::to_value(request("build")).unwrap();
    let span = &json["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(span["name"], "build");
    // OTLP/JSON carries ids as hex, not base64.
    assert_eq!(span["traceId"], "4b".repeat(16));
}

/// A `google.rpc.Status` whose details hold one `google.rpc.RetryInfo`, encoded by hand with
/// the field numbers of google/rpc/status.proto and error_details.proto.
fn retry_info(delay: Duration) -> Vec<u8> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Status {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(message, repeated, tag = "3")]
        details: Vec<Any>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Any {
        #[prost(string, tag = "1")]
        type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        retry_delay: Option<ProtoDuration>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct ProtoDuration {
        #[prost(int64, tag = "1")]
        seconds: i64,
        #[prost(int32, tag = "2")]
        nanos: i32,
    }
    let info = RetryInfo {
        retry_delay: Some(ProtoDuration {
            seconds: i64::try_from(delay.as_secs()).unwrap(),
            nanos: i32::try_from(delay.subsec_nanos()).unwrap(),
        }),
    };
    Status {
        code: tonic::Code::ResourceExhausted as i32,
        details: vec![Any {
            type_url: "type.googleapis.com/google.rpc.RetryInfo".to_owned(),
            value: info.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}
