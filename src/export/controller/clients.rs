//! One OTLP client per distinct destination, built the first time a policy needs it.

use super::Controller;
use crate::otlp::{self, Client, TokenSource};
use crate::policy::{Policy, Protocol};

/// One OTLP client per distinct destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ClientKey {
    endpoint: String,
    protocol: &'static str,
    header: Option<String>,
}

impl Controller {
    /// The client for the policy's exporter, built once per destination.
    pub(super) fn client(&mut self, policy: &Policy) -> Result<Client, ()> {
        let exporter = &policy.exporter;
        // The client speaks gRPC and HTTP/protobuf; an `http/json` receiver (OTLP/HTTP) takes
        // protobuf on the same URL.
        let (protocol, endpoint) = match exporter.protocol {
            Protocol::Grpc => ("grpc", exporter.endpoint.clone()),
            Protocol::HttpProtobuf | Protocol::HttpJson => (
                "http/protobuf",
                exporter
                    .traces_endpoint
                    .clone()
                    .unwrap_or_else(|| otlp::traces_url(&exporter.endpoint)),
            ),
        };
        let header = match (&policy.token, &self.settings.token_file) {
            (Some(token), Some(_)) => Some(token.header.clone()),
            _ => None,
        };
        let key = ClientKey {
            endpoint,
            protocol,
            header,
        };
        if let Some(client) = self.clients.get(&key) {
            return Ok(client.clone());
        }
        let settings = otlp::Settings {
            endpoint: key.endpoint.clone(),
            protocol: protocol.to_owned(),
            token_header: key.header.clone().unwrap_or_default(),
            token: key
                .header
                .as_ref()
                .and(self.settings.token_file.clone())
                .map(TokenSource::File),
            ..otlp::Settings::default()
        };
        let built = otlp::Config::new(&settings)
            .map_err(|e| e.to_string())
            .and_then(|config| Client::new(config).map_err(|e| e.to_string()));
        match built {
            Ok(client) => {
                tracing::info!(endpoint = %key.endpoint, protocol, "OTLP client for a policy's exporter");
                self.clients.insert(key, client.clone());
                Ok(client)
            }
            Err(error) => {
                tracing::warn!(policy = %policy.name, %error, "cannot build the OTLP client for the policy's exporter; retrying later");
                Err(())
            }
        }
    }
}
