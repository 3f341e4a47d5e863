//! Leader election on a `coordination.k8s.io/v1` Lease: one replica at a time does the work
//! only one should do (the webhook's TracingPolicy status writes; the exporter's exports, under
//! its own Lease name).
//!
//! The algorithm is client-go's, on plain GET/POST/PUT of one Lease:
//! - a candidate takes the Lease when it does not exist (create), names no holder, or its
//!   `renewTime + leaseDurationSeconds` has passed; the holder renews it every
//!   [`RENEW_INTERVAL`]. Every change is a PUT carrying the `resourceVersion` read just before,
//!   so of two candidates racing for one Lease the API server accepts one and answers 409 to the
//!   other, which stays a candidate: a conflict never makes two leaders.
//! - a leader that cannot renew for [`RENEW_DEADLINE`] stops leading, before anyone else may
//!   take the Lease ([`LEASE_DURATION`] after its last renewal), so the old and the new leader
//!   never overlap while clocks agree within the difference (5 s; nodes run NTP).
//! - on shutdown the leader stops leading first, then releases the Lease (clears
//!   `holderIdentity`), so a standby takes over at its next try instead of after expiry.
//!
//! Why not a crate: `kube-lease-manager` (the maintained one on kube 5) takes the Lease with
//! server-side apply and renews it with unconditional strategic-merge patches, so its safety
//! rests on field-manager conflicts rather than on `resourceVersion`, it needs the `patch`
//! verb, and it cannot be exercised against a stand-in API server short of reimplementing
//! server-side apply. The algorithm here is a page long.

use std::future::{Future, pending};
use std::pin::pin;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::cluster::metrics;

/// How long a Lease holds without renewal: a standby takes over within about this long after
/// the leader dies (client-go's default, and what the install promises).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews: three renewals per duration, so two may fail in a row.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// A leader that could not renew for this long stops leading: 5 s before anyone may take the
/// Lease, a margin for clock differences and for work already under way.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often a standby looks at the Lease, and how soon a failed renewal is retried. Also the
/// bound on one API call: a call slower than this counts as failed.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Which Lease, who this replica is, and the timings (the constants above, shorter in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// Written as whole seconds (`leaseDurationSeconds`), at least one.
    pub duration: Duration,
    pub renew_interval: Duration,
    pub renew_deadline: Duration,
    pub retry_interval: Duration,
}

impl LeaseConfig {
    /// A Lease with the default timings.
    pub fn new(name: &str, namespace: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            duration: LEASE_DURATION,
            renew_interval: RENEW_INTERVAL,
            renew_deadline: RENEW_DEADLINE,
            retry_interval: RETRY_INTERVAL,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// One candidate for one Lease. [`LeaderElection::run`] campaigns; [`LeaderElection::subscribe`]
/// says, at any time, whether this replica leads.
pub struct LeaderElection {
    api: Api<Lease>,
    config: LeaseConfig,
    leading: watch::Sender<bool>,
    gauge: Gauge,
}

impl LeaderElection {
    /// Registers the `leader` gauge in `registry`. Nothing is requested until [`Self::run`].
    pub fn new(client: Client, config: LeaseConfig, registry: &mut Registry) -> LeaderElection {
        LeaderElection {
            api: Api::namespaced(client, &config.namespace),
            leading: watch::Sender::new(false),
            gauge: metrics::register_leader(registry),
            config,
        }
    }

    /// `true` while this replica leads. Work that needs a single writer checks it before each
    /// write and stops when it turns `false`.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Campaigns and renews until `shutdown` completes; then stops leading and releases the
    /// Lease if it holds it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown);
        // When the last renewal succeeded, while leading.
        let mut renewed: Option<Instant> = None;
        loop {
            let step_down_at = renewed.map(|at| at + self.config.renew_deadline);
            let lost = async move {
                match step_down_at {
                    Some(at) => sleep_until(at).await,
                    None => pending().await,
                }
            };
            let attempt = timeout(self.config.retry_interval, self.attempt());
            // A leader that just renewed waits the renewal interval; anyone else retries soon.
            let mut wait = self.config.retry_interval;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = lost => {
                    tracing::warn!(lease = %self.config.name, "could not renew the Lease in time; stepping down");
                    renewed = None;
                    self.set_leading(false);
                    continue;
                }
                result = attempt => match result {
                    Ok(Ok(true)) => {
                        renewed = Some(Instant::now());
                        self.set_leading(true);
                        wait = self.config.renew_interval;
                    }
                    Ok(Ok(false)) => {
                        renewed = None;
                        self.set_leading(false);
                    }
                    // Still leading until the deadline: one failed call is not a lost Lease.
                    Ok(Err(e)) => tracing::warn!(lease = %self.config.name, error = %e, "Lease request failed; retrying"),
                    Err(_) => tracing::warn!(lease = %self.config.name, "Lease request timed out; retrying"),
                },
            }
            if let Some(at) = renewed {
                let deadline = at + self.config.renew_deadline;
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = sleep(wait) => {}
            }
        }
        let was_leading = *self.leading.borrow();
        self.set_leading(false);
        if was_leading {
            self.release().await;
        }
    }

    fn set_leading(&self, leading: bool) {
        let changed = self.leading.send_if_modified(|now| {
            let changed = *now != leading;
            *now = leading;
            changed
        });
        self.gauge.set(i64::from(leading));
        if changed {
            let (lease, identity) = (&self.config.name, &self.config.identity);
            match leading {
                true => tracing::info!(%lease, %identity, "leading"),
                false => tracing::info!(%lease, %identity, "standing by"),
            }
        }
    }

    /// One look at the Lease: create it, take it, or renew it. `Ok(true)` when this replica
    /// holds it afterwards; `Ok(false)` when someone else does (or won a race for it).
    async fn attempt(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                // A new Lease starts at zero transitions, as client-go's do.
                spec: Some(LeaseSpec {
                    lease_transitions: Some(0),
                    ..self.spec(LeaseSpec::default(), false, now)
                }),
            };
            return won(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        if !mine && is_held(&spec, now) {
            return Ok(false);
        }
        // The metadata as read, resourceVersion included: the PUT is conditional on it.
        let next = Lease {
            metadata: lease.metadata,
            spec: Some(self.spec(spec, mine, now)),
        };
        won(self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await)
    }

    /// The spec after this replica renews (`mine`) or takes the Lease.
    fn spec(&self, previous: LeaseSpec, mine: bool, now: Timestamp) -> LeaseSpec {
        let transitions = previous.lease_transitions.unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.duration_seconds()),
            acquire_time: match mine {
                true => previous.acquire_time.clone(),
                false => Some(MicroTime(now)),
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(match mine {
                true => transitions,
                false => transitions.saturating_add(1),
            }),
            ..previous
        }
    }

    /// Clears `holderIdentity` if this replica still holds the Lease, so a standby need not
    /// wait for it to expire. Bounded: a shutdown does not wait on a slow API server.
    async fn release(&self) {
        let release = async {
            let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            // What client-go writes on release, so its candidates also see the Lease as free.
            spec.lease_duration_seconds = Some(1);
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match timeout(self.config.retry_interval, release).await {
            Ok(Ok(())) => tracing::info!(lease = %self.config.name, "Lease released"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.config.name, error = %e, "releasing the Lease failed; it expires on its own")
            }
            Err(_) => {
                tracing::warn!(lease = %self.config.name, "releasing the Lease timed out; it expires on its own")
            }
        }
    }
}

/// A write's outcome as leadership: accepted, lost to another writer (409), or failed.
fn won(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Someone holds the Lease and has renewed it within its duration.
pub(super) fn is_held(spec: &LeaseSpec, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    !holder.is_empty() && renewed.0 + SignedDuration::from_secs(i64::from(seconds)) > now
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_ago: i64, seconds: i32) -> LeaseSpec {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_ago))),
            lease_duration_seconds: Some(seconds),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_held_until_its_duration_passes_and_only_with_a_holder() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        assert!(is_held(&spec(Some("a"), 14, 15), now));
        assert!(!is_held(&spec(Some("a"), 15, 15), now));
        assert!(!is_held(&spec(Some("a"), 16, 15), now));
        assert!(!is_held(&spec(None, 0, 15), now));
        assert!(!is_held(&spec(Some(""), 0, 15), now));
        assert!(!is_held(&LeaseSpec::default(), now));
    }
}
