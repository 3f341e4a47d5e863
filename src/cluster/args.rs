//! The cluster settings a long-running command flattens into its arguments: which Lease elects
//! its single writer, and who this replica is in it.

use std::path::Path;

use clap::Args;

use crate::cluster::ClusterError;
use crate::cluster::lease::LeaseConfig;

/// Where the API server's service account mount says the pod runs.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Where Linux keeps the host name (a pod's is its name).
const KERNEL_HOSTNAME: &str = "/proc/sys/kernel/hostname";

#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct ClusterArgs {
    /// Namespace of the Lease that elects the one replica doing single-writer work
    /// [default: the pod's namespace, from the service account].
    #[arg(long, value_name = "NAMESPACE", env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's name in the Lease [default: the host name, which is the pod's name].
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub lease_identity: Option<String>,

    /// Name of the Lease [default: the command's own, e.g. lightstep-tekton-webhook].
    #[arg(long, value_name = "NAME")]
    pub lease_name: Option<String>,
}

impl ClusterArgs {
    /// The Lease to campaign for, `default_name` unless `--lease-name` says otherwise. Fails,
    /// naming what to set, when the namespace or the identity cannot be found.
    pub fn lease(&self, default_name: &str) -> Result<LeaseConfig, ClusterError> {
        let namespace = non_empty(self.lease_namespace.clone())
            .or_else(|| read_trimmed(Path::new(SERVICE_ACCOUNT_NAMESPACE)))
            .ok_or(ClusterError::LeaseNamespace)?;
        let identity = non_empty(self.lease_identity.clone())
            .or_else(|| non_empty(std::env::var("HOSTNAME").ok()))
            .or_else(|| read_trimmed(Path::new(KERNEL_HOSTNAME)))
            .ok_or(ClusterError::LeaseIdentity)?;
        let name = non_empty(self.lease_name.clone()).unwrap_or_else(|| default_name.to_owned());
        Ok(LeaseConfig::new(&name, &namespace, &identity))
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn read_trimmed(path: &Path) -> Option<String> {
    non_empty(std::fs::read_to_string(path).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_and_the_command_names_its_lease() {
        let args = ClusterArgs {
            lease_namespace: Some("tracing".into()),
            lease_identity: Some(" webhook-7d9f ".into()),
            lease_name: None,
        };
        let lease = args.lease("lightstep-tekton-webhook").unwrap();
        assert_eq!(lease.namespace, "tracing");
        assert_eq!(lease.identity, "webhook-7d9f");
        assert_eq!(lease.name, "lightstep-tekton-webhook");
        let renamed = ClusterArgs {
            lease_name: Some("other".into()),
            ..args
        };
        assert_eq!(
            renamed.lease("lightstep-tekton-webhook").unwrap().name,
            "other"
        );
    }

    #[test]
    fn a_missing_namespace_names_what_to_set() {
        if Path::new(SERVICE_ACCOUNT_NAMESPACE).exists() {
            return; // Running in a pod: the service account answers.
        }
        let err = ClusterArgs::default().lease("l").unwrap_err().to_string();
        assert!(
            err.contains("--lease-namespace") && err.contains("POD_NAMESPACE"),
            "{err}"
        );
    }
}
