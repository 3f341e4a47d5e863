//! OTLP/HTTP with protobuf bodies: one `POST` of the encoded request to the traces URL.
//!
//! HTTP/1.1 only: every OTLP/HTTP receiver speaks it, the connection is kept alive between
//! exports, and one request at a time gains nothing from HTTP/2 multiplexing.

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderName, RETRY_AFTER, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;

use super::error::{Failure, clip};
use super::retry;
use super::token::Token;
use super::{USER_AGENT_VALUE, transport_failure};

/// The most of a response body that is read: an OTLP response is a partial-success count and a
/// short message; anything longer is a proxy's error page, and its first bytes say enough.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The OTLP/HTTP protobuf content type.
const PROTOBUF: &str = "application/x-protobuf";

#[derive(Debug)]
pub(crate) struct HttpTransport {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
}

impl HttpTransport {
    pub(crate) fn new(url: Uri, tls: rustls::ClientConfig) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self { client, url }
    }

    /// One attempt. `Ok` carries the number of spans the receiver said it rejected.
    pub(crate) async fn send(
        &self,
        body: Bytes,
        token: Option<(&HeaderName, &Token)>,
    ) -> Result<i64, Failure> {
        let mut request = Request::post(self.url.clone())
            .header(CONTENT_TYPE, PROTOBUF)
            .header(USER_AGENT, USER_AGENT_VALUE)
            .body(Full::new(body))
            .map_err(|_| Failure::new(super::Cause::Rejected, false, "bad request".into()))?;
        if let Some((name, token)) = token {
            request
                .headers_mut()
                .insert(name.clone(), token.header_value().clone());
        }
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| transport_failure(&e))?;
        let status = response.status();
        let server_delay = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| retry::retry_after(v.as_bytes()));
        // A body cut short after a success status is still a success; after an error status it
        // only loses the message.
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            let reply = ExportTraceServiceResponse::decode(body).unwrap_or_default();
            return Ok(reply.partial_success.map_or(0, |p| p.rejected_spans));
        }
        let (cause, retryable) = retry::http_status(status.as_u16());
        let message = retry::rpc_status_message(&body)
            .or_else(|| String::from_utf8(body.to_vec()).ok())
            .filter(|m| !m.trim().is_empty());
        let token_bytes = token.map(|(_, t)| t.header_value().as_bytes());
        let detail = match message {
            Some(m) => format!("HTTP {}: {}", status.as_u16(), clip(m.trim(), token_bytes)),
            None => format!("HTTP {}", status.as_u16()),
        };
        Err(Failure {
            cause,
            retryable,
            detail,
            server_delay: server_delay.filter(|_| retryable),
        })
    }
}
