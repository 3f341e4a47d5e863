//! The OTLP trace client: one `ExportTraceServiceRequest` in, delivered to a collector or to
//! Lightstep, or an [`ExportError`] with a stable [`Cause`] label and whether it may pass.
//!
//! - **Protocols**: gRPC (`TraceService/Export`, tonic's generated client) and HTTP/protobuf
//!   (`POST` to the traces URL); see `config` for the endpoint rules. The Lightstep default,
//!   `https://ingest.lightstep.com:443` over gRPC, is [`Settings::default`].
//! - **TLS** through rustls with ring, trusting the platform's roots plus an optional CA file;
//!   `http://` goes in the clear, for a collector in the cluster.
//! - **Token**: a header (default `lightstep-access-token`) whose value comes from a file,
//!   re-read on each export so a rotated Secret is picked up, or from an environment variable.
//!   The value is a [`Token`], which never prints; error text from the server is clipped and has
//!   any copy of the token replaced.
//! - **Retries**: each attempt has a timeout; retryable failures (OTLP's list, plus connection
//!   failures and our own timeouts) are tried again with exponential backoff and jitter, up to
//!   [`RetryPolicy::max_attempts`], honouring the server's `Retry-After` or RetryInfo.
//!
//! The client logs only events (a warning per retried attempt), never spans: it also exports
//! the server's own spans ([`SpanExporter`]), and spans about exporting would feed themselves.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use lightstep_tekton_webhook::otlp::{Client, Config, Settings, TokenSource};
//! use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
//!
//! let settings = Settings {
//!     token: Some(TokenSource::File("/var/run/secrets/lightstep/access-token".into())),
//!     ..Settings::default()
//! };
//! let client = Client::new(Config::new(&settings)?)?;
//! let delivery = client.export(ExportTraceServiceRequest::default()).await?;
//! assert_eq!(delivery.rejected_spans, 0);
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod grpc;
mod http;
mod retry;
mod sdk;
mod split;
mod tls;
mod token;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

pub use config::{
    Config, ConfigError, LIGHTSTEP_ENDPOINT, LIGHTSTEP_TOKEN_HEADER, Protocol, Settings, traces_url,
};
pub use error::{Cause, ExportError};
pub use retry::RetryPolicy;
pub use sdk::SpanExporter;
pub use split::split;
pub use token::{Token, TokenError, TokenSource};

use error::Failure;
use token::TokenHeader;

/// Sent as `User-Agent` so a receiver's logs say who called.
const USER_AGENT_VALUE: &str = concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION"));

/// A delivered export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Attempts made, the first included.
    pub attempts: u32,
    /// Spans the receiver accepted the request for but dropped (OTLP partial success). Not
    /// retried: the receiver has said they will never fit.
    pub rejected_spans: i64,
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("OTLP client: {0}")]
    Tls(String),
    #[error("OTLP client: {0}")]
    Endpoint(String),
    #[error("OTLP client: must be created inside a Tokio runtime (its connection tasks run there)")]
    NoRuntime,
}

/// A cheap handle (clone it freely) on one endpoint's connection and token.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    transport: Transport,
    token: Option<TokenHeader>,
    timeout: Duration,
    retry: RetryPolicy,
}

#[derive(Debug)]
enum Transport {
    Grpc(grpc::GrpcTransport),
    // Boxed: the pooled HTTP client is several times the size of a tonic channel handle.
    Http(Box<http::HttpTransport>),
}

impl Client {
    /// Builds the TLS configuration and the (lazy) connection. Does not dial: the first export
    /// does, so a receiver that starts later is no startup failure.
    pub fn new(config: Config) -> Result<Self, ClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::NoRuntime);
        }
        let tls = tls::client_config(&config.extra_roots).map_err(ClientError::Tls)?;
        let transport = match config.protocol {
            Protocol::Grpc => Transport::Grpc(
                grpc::GrpcTransport::new(config.endpoint, tls, config.timeout)
                    .map_err(ClientError::Endpoint)?,
            ),
            Protocol::HttpProtobuf => {
                Transport::Http(Box::new(http::HttpTransport::new(config.endpoint, tls)))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                transport,
                token: config.token,
                timeout: config.timeout,
                retry: config.retry,
            }),
        })
    }

    /// Sends the request, retrying as the policy allows.
    pub async fn export(
        &self,
        request: ExportTraceServiceRequest,
    ) -> Result<Delivery, ExportError> {
        let inner = &*self.inner;
        // Encoded once for HTTP; gRPC hands tonic the message (a clone per attempt).
        let route = match &inner.transport {
            Transport::Http(http) => Route::Http(http, request.encode_to_vec().into()),
            Transport::Grpc(grpc) => Route::Grpc(grpc, request),
        };
        let mut attempt = 1;
        loop {
            let token = inner.token.as_ref().map(|t| (t.name(), t.current()));
            let token = token.as_ref().map(|(name, token)| (*name, token));
            let sent = async {
                match &route {
                    Route::Http(http, body) => http.send(body.clone(), token).await,
                    Route::Grpc(grpc, request) => {
                        grpc.send(request.clone(), token, inner.timeout).await
                    }
                }
            };
            let failure = match tokio::time::timeout(inner.timeout, sent).await {
                Ok(Ok(rejected_spans)) => {
                    return Ok(Delivery {
                        attempts: attempt,
                        rejected_spans,
                    });
                }
                Ok(Err(failure)) => failure,
                Err(_) => Failure::new(
                    Cause::Timeout,
                    true,
                    format!("no answer within {} ms", inner.timeout.as_millis()),
                ),
            };
            if !failure.retryable || attempt >= inner.retry.max_attempts {
                return Err(ExportError::new(failure, attempt));
            }
            let delay = inner
                .retry
                .delay(attempt, failure.server_delay, fastrand::f64());
            tracing::warn!(
                attempt,
                cause = failure.cause.as_str(),
                detail = %failure.detail,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "OTLP export attempt failed; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// One export's payload, in the form its transport sends.
enum Route<'a> {
    Http(&'a http::HttpTransport, hyper::body::Bytes),
    Grpc(&'a grpc::GrpcTransport, ExportTraceServiceRequest),
}

/// Classifies a failure below HTTP from its error chain: a TLS failure is permanent (a wrong
/// certificate does not fix itself between retries), a timeout or any other connection
/// failure is retryable.
fn transport_failure(error: &(dyn std::error::Error + 'static)) -> Failure {
    let mut innermost = error;
    let mut current = Some(error);
    while let Some(e) = current {
        innermost = e;
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Failure::new(
                Cause::Tls,
                false,
                format!("TLS: {}", short(&tls.to_string())),
            );
        }
        let io = e.downcast_ref::<std::io::Error>();
        if e.is::<tonic::TimeoutExpired>()
            || io.is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return Failure::new(Cause::Timeout, true, "connection timed out".into());
        }
        // An `io::Error`'s `source()` skips the error it wraps (tokio-rustls wraps its
        // `rustls::Error` so, and connectors wrap that again), so step into it by hand.
        current = match io {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    Failure::new(
        Cause::Transport,
        true,
        format!("connection failed: {}", short(&innermost.to_string())),
    )
}

/// Local error text, clipped like a server's (it names addresses and OS errors, no token).
fn short(text: &str) -> String {
    error::clip(text, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_runtime_the_client_is_an_error_not_a_panic() {
        let config = Config::new(&Settings::default()).unwrap();
        assert!(matches!(Client::new(config), Err(ClientError::NoRuntime)));
    }
}
