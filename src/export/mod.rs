//! Export: the run-span exporter, getting finished runs' spans out of the cluster.
//!
//! - The run-span exporter (`lightstep-tekton-webhook export`, [`command`]): finished
//!   PipelineRuns and TaskRuns in opted-in namespaces become span trees ([`crate::spans`]) and
//!   are sent once. [`decide`] says which runs are due (finished, unmarked, in a served
//!   namespace whose policy has `runSpans.enabled`, within the backfill window); [`queue`] holds
//!   them, bounded; [`controller`] sends them through one OTLP client ([`crate::otlp`]) per
//!   destination and marks each run with `lightstep-tekton.io/exported` once the backend
//!   accepted it, holding the finalizer `lightstep-tekton.io/export` on it until then (or its
//!   `--store-deadline`); [`metrics`]
//!   counts it all. The watches and the patch are the cluster room's
//!   ([`crate::cluster::runs`]); the leader election is [`crate::cluster::LeaderElection`] on
//!   the exporter's own Lease.
//!
//! Trade-offs: exactly once holds in practice, not in theory (a crash between the backend's
//! answer and the patch sends that run again; see [`controller`]); a PipelineRun is sent as one
//! request with all its TaskRuns, so a backend sees a run whole or not at all; runs that finished
//! before the exporter started are sent only within `--backfill`, so an install on a busy
//! cluster does not replay its history.

pub mod command;
pub mod controller;
pub mod decide;
pub mod metrics;
pub mod queue;
