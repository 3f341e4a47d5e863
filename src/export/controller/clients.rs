//! One OTLP client per distinct destination, built the first time a policy needs it, and
//! each destination's backoff.
//!
//! The clients make one attempt per call: a retry waits in the queue, never asleep in a
//! concurrency slot. Each destination is a small circuit breaker ([`Backoffs`]): until it has
//! answered, and after it failed (down, a typo'd endpoint, a wrong token), one run at a time
//! probes it and its other runs wait in the queue, until its next allowed time once it failed;
//! so one broken destination holds at most one slot and the others get the rest.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::Controller;
use super::flight::RUN_RETRY;
use crate::otlp::{self, Client, RetryPolicy, TokenSource};
use crate::policy::{Policy, Protocol};

/// How often a run waiting for its destination's probe looks again: the probe's answer takes
/// a round trip, or one attempt's timeout (10 s) from a destination that hangs.
const PROBE_RECHECK: Duration = Duration::from_secs(1);

/// One OTLP client per distinct destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ClientKey {
    endpoint: String,
    protocol: &'static str,
    header: Option<String>,
}

/// One destination's breaker.
#[derive(Debug)]
struct Breaker {
    /// Its last answer was an acceptance (or a refusal of the request itself): send freely.
    healthy: bool,
    /// Failures in a row, for the backoff.
    failures: u32,
    /// Not tried again before this.
    next: Instant,
    /// A probe is in flight.
    probing: bool,
}

/// Each destination's breaker.
#[derive(Debug, Default)]
pub(super) struct Backoffs(HashMap<ClientKey, Breaker>);

impl Backoffs {
    /// When a run for the destination should look again, if it may not be sent now.
    pub(super) fn blocked(&self, key: &ClientKey, now: Instant) -> Option<Instant> {
        let breaker = self.0.get(key)?;
        if breaker.healthy {
            None
        } else if breaker.probing {
            Some(now + PROBE_RECHECK)
        } else {
            (breaker.next > now).then_some(breaker.next)
        }
    }

    /// A run is being sent to the destination: its probe, unless the destination is healthy.
    pub(super) fn sending(&mut self, key: &ClientKey, now: Instant) {
        let breaker = self.0.entry(key.clone()).or_insert(Breaker {
            healthy: false,
            failures: 0,
            next: now,
            probing: false,
        });
        if !breaker.healthy {
            breaker.probing = true;
        }
    }

    /// The destination failed: its next allowed time, backed off as a run's retries are.
    pub(super) fn failed(&mut self, key: &ClientKey, now: Instant) -> Instant {
        self.sending(key, now);
        let breaker = self.0.get_mut(key).expect("inserted by sending");
        breaker.healthy = false;
        breaker.probing = false;
        breaker.failures = breaker.failures.saturating_add(1);
        breaker.next = now + RUN_RETRY.delay(breaker.failures, None, fastrand::f64());
        breaker.next
    }

    /// The destination answered: healthy again.
    pub(super) fn answered(&mut self, key: &ClientKey) {
        if let Some(breaker) = self.0.get_mut(key) {
            breaker.healthy = true;
            breaker.failures = 0;
            breaker.probing = false;
        }
    }
}

impl Controller {
    /// The policy's destination and its client, built once per destination.
    pub(super) fn client(&mut self, policy: &Policy) -> (ClientKey, Result<Client, ()>) {
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
            return (key, Ok(client.clone()));
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
            ca_file: self.settings.ca_file.clone(),
            // One attempt per call: the controller's queue does the retrying.
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
            ..otlp::Settings::default()
        };
        let built = otlp::Config::new(&settings)
            .map_err(|e| e.to_string())
            .and_then(|config| Client::new(config).map_err(|e| e.to_string()));
        match built {
            Ok(client) => {
                tracing::info!(endpoint = %key.endpoint, protocol, "OTLP client for a policy's exporter");
                self.clients.insert(key.clone(), client.clone());
                (key, Ok(client))
            }
            Err(error) => {
                tracing::warn!(policy = %policy.name, %error, "cannot build the OTLP client for the policy's exporter; retrying later");
                (key, Err(()))
            }
        }
    }
}
