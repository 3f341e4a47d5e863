//! OTLP over gRPC: tonic's generated `TraceService` client on a channel whose connector is
//! hyper-rustls (TLS for `https://`, plain TCP with HTTP/2 prior knowledge for `http://`).

use std::time::Duration;

use hyper::Uri;
use hyper::header::{HeaderMap, HeaderName};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use super::error::{Failure, clip};
use super::retry;
use super::token::Token;
use super::{USER_AGENT_VALUE, transport_failure};

#[derive(Debug)]
pub(crate) struct GrpcTransport {
    client: TraceServiceClient<Channel>,
}

impl GrpcTransport {
    /// Connects lazily: the first export dials, and the channel redials after a broken
    /// connection, so a collector that is not up yet does not stop startup.
    pub(crate) fn new(
        endpoint: Uri,
        tls: rustls::ClientConfig,
        timeout: Duration,
    ) -> Result<Self, String> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .build();
        let channel = Endpoint::from(endpoint)
            .user_agent(USER_AGENT_VALUE)
            .map_err(|_| "user agent: not a header value".to_owned())?
            .connect_timeout(timeout)
            .connect_with_connector_lazy(connector);
        Ok(Self {
            client: TraceServiceClient::new(channel),
        })
    }

    /// One attempt. `Ok` carries the number of spans the receiver said it rejected.
    pub(crate) async fn send(
        &self,
        request: ExportTraceServiceRequest,
        token: Option<(&HeaderName, &Token)>,
        timeout: Duration,
    ) -> Result<i64, Failure> {
        let mut request = tonic::Request::new(request);
        if let Some((name, token)) = token {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), token.header_value().clone());
            *request.metadata_mut() = MetadataMap::from_headers(headers);
        }
        // Tells the server our deadline (grpc-timeout) so it can give up when we do.
        request.set_timeout(timeout);
        // The channel is shared; each call takes its own handle to it.
        let mut client = self.client.clone();
        match client.export(request).await {
            Ok(reply) => Ok(reply
                .into_inner()
                .partial_success
                .map_or(0, |p| p.rejected_spans)),
            // Transport failures come back as a status that carries the underlying error;
            // a status the server sent carries none.
            Err(status) if std::error::Error::source(&status).is_some() => {
                Err(transport_failure(&status))
            }
            Err(status) => {
                let server_delay = retry::retry_info_delay(status.details());
                let (cause, retryable) = retry::grpc_code(status.code(), server_delay.is_some());
                let token_bytes = token.map(|(_, t)| t.header_value().as_bytes());
                let detail = match status.message().trim() {
                    "" => format!("gRPC {:?}", status.code()),
                    message => format!("gRPC {:?}: {}", status.code(), clip(message, token_bytes)),
                };
                Err(Failure {
                    cause,
                    retryable,
                    detail,
                    server_delay: server_delay.filter(|_| retryable),
                })
            }
        }
    }
}
