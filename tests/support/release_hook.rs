//! The hook that releases the exporter's finalizers, as the chart renders it (and as
//! manifests/uninstall holds it): its own ServiceAccount, a ClusterRole granting only what
//! `export --release-finalizers` asks for, the binding, and a Job running that command with the
//! install's image and hardening, each a Helm hook of the expected kind.
#![allow(dead_code)]

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use lightstep_tekton_webhook::cluster::EXPORTER_LEASE;
use serde_json::Value;

use super::install::{Install, NAMESPACE, typed};

/// The rules `export --release-finalizers` needs: list the runs, get one again, patch it.
pub fn expected_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec!["tekton.dev".into()]),
        resources: Some(vec!["pipelineruns".into(), "taskruns".into()]),
        verbs: vec!["get".into(), "list".into(), "patch".into()],
        ..PolicyRule::default()
    }]
}

/// The rule for waiting on the exporter's Lease: `get` on that one Lease.
pub fn expected_lease_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".into()]),
        resources: Some(vec!["leases".into()]),
        resource_names: Some(vec![EXPORTER_LEASE.into()]),
        verbs: vec!["get".into()],
        ..PolicyRule::default()
    }]
}

/// The hook's objects, decoded.
pub struct ReleaseHook {
    pub account: ServiceAccount,
    pub role: ClusterRole,
    pub binding: ClusterRoleBinding,
    pub lease_role: Role,
    pub lease_binding: RoleBinding,
    pub job: Job,
}

impl ReleaseHook {
    pub fn decode(objects: &[Value]) -> ReleaseHook {
        let one = |kind: &str| -> &Value {
            let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
            assert_eq!(
                found.len(),
                1,
                "one {kind} in the release hook: {objects:?}"
            );
            found[0]
        };
        assert_eq!(objects.len(), 6, "{objects:?}");
        ReleaseHook {
            account: typed(one("ServiceAccount")),
            role: typed(one("ClusterRole")),
            binding: typed(one("ClusterRoleBinding")),
            lease_role: typed(one("Role")),
            lease_binding: typed(one("RoleBinding")),
            job: typed(one("Job")),
        }
    }

    /// The Job's container arguments.
    pub fn args(&self) -> Vec<String> {
        let pod = self
            .job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        pod.containers[0].args.clone().unwrap()
    }
}

/// Checks the hook against the install it belongs to; `hooks` is the `helm.sh/hook` annotation
/// every object must carry.
pub fn check_release_hook(install: &Install, hooks: &str) -> ReleaseHook {
    let hook = ReleaseHook::decode(&install.release_hook);
    let weight = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| -> i32 {
        let annotations = meta.annotations.as_ref().expect("hook annotations");
        assert_eq!(annotations["helm.sh/hook"], hooks, "{:?}", meta.name);
        assert_eq!(
            annotations["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded",
            "{:?}",
            meta.name
        );
        annotations["helm.sh/hook-weight"].parse().unwrap()
    };
    let job_weight = weight(&hook.job.metadata);
    for meta in [
        &hook.account.metadata,
        &hook.role.metadata,
        &hook.binding.metadata,
    ] {
        assert!(
            weight(meta) < job_weight,
            "{:?} is made before the Job",
            meta.name
        );
    }

    // RBAC: exactly what the command uses, bound to the hook's own account.
    assert_eq!(
        hook.role.rules.as_ref().unwrap(),
        &expected_rules(),
        "charts/lightstep-tekton-webhook/templates/release-finalizers.yaml: the ClusterRole must grant exactly what --release-finalizers uses"
    );
    assert_eq!(hook.binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        hook.binding.role_ref.name,
        hook.role.metadata.name.clone().unwrap()
    );
    let subjects = hook.binding.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), hook.account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(hook.account.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        hook.lease_role.rules.as_ref().unwrap(),
        &expected_lease_rules()
    );
    assert_eq!(
        hook.lease_role.metadata.namespace.as_deref(),
        Some(NAMESPACE)
    );
    assert_eq!(hook.lease_binding.role_ref.kind, "Role");
    assert_eq!(
        hook.lease_binding.role_ref.name,
        hook.lease_role.metadata.name.clone().unwrap()
    );
    assert_eq!(hook.lease_binding.subjects, hook.binding.subjects);
    assert_eq!(hook.account.automount_service_account_token, Some(false));

    // The Job: the command, the install's image, the same hardening as the webhook's pods.
    assert_eq!(hook.job.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = hook.job.spec.as_ref().unwrap();
    assert!(spec.backoff_limit.is_some_and(|n| n > 0));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, hook.account.metadata.name);
    assert_eq!(pod.automount_service_account_token, Some(true));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.security_context, install.pod_spec().security_context);
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    assert_eq!(container.image, install.container().image);
    assert_eq!(
        container.security_context,
        install.container().security_context
    );
    assert!(container.resources.as_ref().unwrap().limits.is_some());
    let args = hook.args();
    assert_eq!(args[..2], ["export", "--release-finalizers"], "{args:?}");
    assert!(
        args.iter().any(|a| a.starts_with("--wait-for-exporter=")),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--lease-namespace={NAMESPACE}")),
        "{args:?}"
    );
    hook
}
