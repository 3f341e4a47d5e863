//! The OpenTelemetry SDK's `SpanExporter` on top of the [`Client`], so the server's own spans
//! can go out over gRPC or HTTP, with TLS and the token, like the run spans.
//!
//! Spans are converted by opentelemetry-proto's `transform` helpers. Each export runs on the
//! Tokio runtime the exporter was created in and is awaited through its join handle, so the
//! exporter works under either batch processor: the async-runtime one, and the default one,
//! whose own thread polls exports with a plain executor that has no Tokio timers or sockets.

use std::fmt;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::SpanData;

use super::{Client, ClientError};

/// An SDK span exporter that sends through a [`Client`].
pub struct SpanExporter {
    client: Client,
    resource: ResourceAttributesWithSchema,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter {
    /// Must be called inside the Tokio runtime that will carry the exports.
    pub fn new(client: Client) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        Ok(Self {
            client,
            resource: ResourceAttributesWithSchema::default(),
            runtime,
        })
    }
}

impl fmt::Debug for SpanExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanExporter")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl opentelemetry_sdk::trace::SpanExporter for SpanExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        let client = self.client.clone();
        let delivered = self
            .runtime
            .spawn(async move { client.export(request).await })
            .await
            .map_err(|_| OTelSdkError::InternalFailure("OTLP export task did not finish".into()))?;
        match delivered {
            Ok(_) => Ok(()),
            Err(error) => Err(OTelSdkError::InternalFailure(error.to_string())),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }
}
