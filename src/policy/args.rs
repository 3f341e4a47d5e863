//! Where a long-running command's policy comes from, as one argument group that `serve` and
//! `export` both flatten: the same flags, environment variables and defaults in each.

use std::path::PathBuf;

/// The policy file and whether TracingPolicies are chosen from the cluster.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PolicyArgs {
    /// Policy file (YAML); the embedded default (Lightstep profile) when omitted. Re-read when
    /// it changes; an invalid version is refused and the previous one kept (docs/policy.md).
    #[arg(long, value_name = "FILE", env = "LIGHTSTEP_TEKTON_POLICY")]
    pub policy: Option<PathBuf>,

    /// Choose each namespace's policy among the cluster's TracingPolicies (watched with the
    /// namespaces' labels; needs the in-cluster service account or KUBECONFIG); --policy applies
    /// where none matches. Readiness waits until both are listed.
    #[arg(long, env = "LIGHTSTEP_TEKTON_WATCH_TRACING_POLICIES", value_name = "BOOL",
          action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false,
          default_missing_value = "true")]
    pub watch_tracing_policies: bool,
}
