//! The cluster settings a long-running command flattens into its arguments: which Lease elects
//! its single writer, and who this replica is in it.

use std::path::Path;

use clap::Args;
use kube::config::Kubeconfig;

use crate::cluster::ClusterError;
use crate::cluster::lease::LeaseConfig;

/// Where the API server's service account mount says the pod runs.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Where Linux keeps the host name (a pod's is its name).
const KERNEL_HOSTNAME: &str = "/proc/sys/kernel/hostname";

#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct ClusterArgs {
    /// Namespace of the Lease that elects the one replica doing single-writer work [default:
    /// in a pod, its namespace (the service account's namespace file); otherwise the kubeconfig's
    /// current context's namespace, else `default`; the choice is logged at start].
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
    /// The Lease to campaign for, `default_name` unless `--lease-name` says otherwise; its
    /// namespace as [`lease_namespace`] finds it. Fails, naming what to set, when the identity
    /// cannot be found.
    pub fn lease(&self, default_name: &str) -> Result<LeaseConfig, ClusterError> {
        let (namespace, from) = lease_namespace(
            self.lease_namespace.clone(),
            Path::new(SERVICE_ACCOUNT_NAMESPACE),
            || Kubeconfig::read().ok(),
        );
        tracing::info!(namespace, from = from.describe(), "Lease namespace");
        let identity = non_empty(self.lease_identity.clone())
            .or_else(|| non_empty(std::env::var("HOSTNAME").ok()))
            .or_else(|| read_trimmed(Path::new(KERNEL_HOSTNAME)))
            .ok_or(ClusterError::LeaseIdentity)?;
        let name = non_empty(self.lease_name.clone()).unwrap_or_else(|| default_name.to_owned());
        Ok(LeaseConfig::new(&name, &namespace, &identity))
    }
}

/// Where the Lease's namespace came from, for the line that says it at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceFrom {
    /// `--lease-namespace` or `POD_NAMESPACE`.
    Flag,
    /// The service account's namespace file: running in a pod.
    ServiceAccount,
    /// The kubeconfig's current context.
    Kubeconfig,
    /// Nothing said: `default`, as kubectl would.
    Default,
}

impl NamespaceFrom {
    pub fn describe(self) -> &'static str {
        match self {
            NamespaceFrom::Flag => "--lease-namespace or POD_NAMESPACE",
            NamespaceFrom::ServiceAccount => SERVICE_ACCOUNT_NAMESPACE,
            NamespaceFrom::Kubeconfig => "the kubeconfig's current context",
            NamespaceFrom::Default => {
                "the default (no flag, service account or kubeconfig namespace)"
            }
        }
    }
}

/// The Lease's namespace: the flag; else, in a pod, the service account's namespace file
/// (`service_account`); else the namespace of the current context of the kubeconfig that
/// `kubeconfig` reads (`KUBECONFIG` or `~/.kube/config`, read only when needed); else `default`.
pub fn lease_namespace(
    flag: Option<String>,
    service_account: &Path,
    kubeconfig: impl FnOnce() -> Option<Kubeconfig>,
) -> (String, NamespaceFrom) {
    if let Some(namespace) = non_empty(flag) {
        return (namespace, NamespaceFrom::Flag);
    }
    if let Some(namespace) = read_trimmed(service_account) {
        return (namespace, NamespaceFrom::ServiceAccount);
    }
    let from_context = kubeconfig().and_then(|config| {
        let current = config.current_context?;
        let named = config.contexts.into_iter().find(|c| c.name == current)?;
        non_empty(named.context?.namespace)
    });
    match from_context {
        Some(namespace) => (namespace, NamespaceFrom::Kubeconfig),
        None => ("default".to_owned(), NamespaceFrom::Default),
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

    fn kubeconfig(context_namespace: Option<&str>) -> Kubeconfig {
        let namespace = context_namespace.map_or(String::new(), |ns| format!(", namespace: {ns}"));
        Kubeconfig::from_yaml(&format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"https://k\"}}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: other\n  context: {{cluster: c, user: u, namespace: elsewhere}}\n\
             - name: mine\n  context: {{cluster: c, user: u{namespace}}}\ncurrent-context: mine\n"
        ))
        .unwrap()
    }

    #[test]
    fn the_lease_namespace_comes_from_the_flag_the_pod_the_kubeconfig_or_default() {
        let file = std::env::temp_dir().join(format!("lease-ns-{}", std::process::id()));
        std::fs::write(&file, "tracing\n").unwrap();
        let absent = file.with_extension("absent");
        let context = || Some(kubeconfig(Some("team-ci")));

        // The flag wins over everything; the kubeconfig is not even read.
        let unread = || -> Option<Kubeconfig> { panic!("kubeconfig read") };
        let flag = lease_namespace(Some(" ops ".into()), &file, unread);
        assert_eq!(flag, ("ops".to_owned(), NamespaceFrom::Flag));
        // In a pod: the service account's file, over the kubeconfig.
        assert_eq!(
            lease_namespace(Some(" ".into()), &file, context),
            ("tracing".to_owned(), NamespaceFrom::ServiceAccount)
        );
        // Outside: the current context's namespace (not another context's), else default.
        assert_eq!(
            lease_namespace(None, &absent, context),
            ("team-ci".to_owned(), NamespaceFrom::Kubeconfig)
        );
        assert_eq!(
            lease_namespace(None, &absent, || Some(kubeconfig(None))),
            ("default".to_owned(), NamespaceFrom::Default)
        );
        assert_eq!(
            lease_namespace(None, &absent, || None),
            ("default".to_owned(), NamespaceFrom::Default)
        );
        std::fs::remove_file(&file).unwrap();
    }
}
