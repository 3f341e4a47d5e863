//! The install's checks, shared by the two ways it is built: `tests/manifests.rs` (the kustomize
//! overlays) and `tests/chart.rs` (the Helm chart with several value sets). Every object decodes
//! into its k8s-openapi type without losing a field; the pieces agree with each other and with the
//! binary (the Service the webhooks call, the ports, the mounted files the server reads); the
//! hardening, the RBAC exactly as the code needs it, the CRD as the code generates it. And the
//! binary itself, started with the Deployment's own arguments and files.
//!
//! Declared by those two suites only (with `tmp`, which it uses), so the other suites do not
//! compile it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Secret, Service, ServiceAccount, ServicePort,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lightstep_tekton_webhook::admission::validate::{POLICY_KEY, POLICY_LABEL};
use lightstep_tekton_webhook::policy::Policy;
use lightstep_tekton_webhook::policy::resource::{self, TracingPolicy};
use lightstep_tekton_webhook::{certs, cluster};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::tmp::{TempDir, free_port};

pub const BIN: &str = env!("CARGO_BIN_EXE_lightstep-tekton-webhook");
pub const NAMESPACE: &str = "lightstep-tekton";
pub const SERVICE: &str = "lightstep-tekton-webhook";
/// What the opt-in and the enforced webhook must be, from issue 4 and the server's routes.
pub const WEBHOOKS: [(&str, &str, &str, &str); 2] = [
    ("inject.lightstep-tekton.io", "enabled", "/mutate", "Ignore"),
    (
        "enforce.lightstep-tekton.io",
        "enforced",
        "/enforce",
        "Fail",
    ),
];
/// Objects of a multi-document YAML stream (kustomize's or Helm's output), empty documents left out.
pub fn parse_objects(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// What a rendering of the install should hold, where the ways of building it differ.
#[derive(Clone)]
pub struct Expect {
    /// kustomize's base has the Namespace object; Helm installs into a namespace it is given.
    pub namespace_object: bool,
    /// The webhooks, in order: (name, namespace label value, path, failurePolicy).
    pub webhooks: Vec<(&'static str, &'static str, &'static str, &'static str)>,
    /// Namespaces excluded besides the install's own and kube-system.
    pub excluded_namespaces: Vec<String>,
    pub replicas: i32,
    /// The Secret holding the serving certificate, mounted by the Deployment.
    pub tls_secret: String,
    /// Namespaces given a token Secret (the chart's token.create); none anywhere else.
    pub token_namespaces: Vec<String>,
    /// The ValidatingWebhookConfiguration for the policy ConfigMap and TracingPolicies.
    pub validating: bool,
    /// The run-span exporter's replicas, or `None` when the install has no exporter.
    pub exporter: Option<i32>,
}

impl Default for Expect {
    /// The install as manifests/base and the chart's defaults describe it.
    fn default() -> Expect {
        Expect {
            namespace_object: true,
            webhooks: WEBHOOKS.to_vec(),
            excluded_namespaces: Vec::new(),
            replicas: 2,
            tls_secret: "lightstep-tekton-webhook-tls".to_string(),
            token_namespaces: Vec::new(),
            validating: true,
            exporter: Some(2),
        }
    }
}

pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Secret `data` is base64 that kustomize may wrap over several lines; the API server's decoder
/// skips the line breaks, k8s-openapi's does not. Secrets only: a ConfigMap's data is text whose
/// whitespace matters (stripping it once turned the policy file into a single comment line, which
/// parses as the default policy and hid any drift).
pub fn unwrap_secret_data(object: &mut Value) {
    if object["kind"] != "Secret" {
        return;
    }
    if let Some(data) = object.get_mut("data").and_then(Value::as_object_mut) {
        for value in data.values_mut() {
            if let Some(s) = value.as_str() {
                *value = Value::String(s.split_whitespace().collect());
            }
        }
    }
}

/// Decodes `object` into `T` and checks that nothing was dropped on the way: a misspelt or
/// misplaced field would be silently ignored by the API server's non-strict clients too.
pub fn typed<T: DeserializeOwned + serde::Serialize>(object: &Value) -> T {
    let mut object = object.clone();
    unwrap_secret_data(&mut object);
    let deserializer = object.clone();
    let value: T = serde_path_to_error::deserialize(deserializer)
        .unwrap_or_else(|e| panic!("{} {}: {e}", object["kind"], object["metadata"]["name"]));
    let back = whole_numbers(serde_json::to_value(&value).unwrap());
    assert_eq!(
        back,
        whole_numbers(object.clone()),
        "{} {} does not round-trip through its schema (unknown or misplaced field?)",
        object["kind"],
        object["metadata"]["name"]
    );
    value
}

/// `1.0` as `1`: kustomize writes a whole float as an integer, and a schema's `maximum` (an
/// f64 in k8s-openapi) comes back as a float; the round trip is about fields, not number types.
fn whole_numbers(value: Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(whole_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, whole_numbers(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Every rendered object, by kind; each one decoded into its k8s-openapi type, or for
/// cert-manager's kinds checked for the fields this install relies on.
#[derive(Default)]
pub struct Install {
    pub namespaces: Vec<Namespace>,
    pub service_accounts: Vec<ServiceAccount>,
    pub deployments: Vec<Deployment>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub services: Vec<Service>,
    pub config_maps: Vec<ConfigMap>,
    pub secrets: Vec<Secret>,
    pub webhook_configs: Vec<MutatingWebhookConfiguration>,
    pub validating_configs: Vec<ValidatingWebhookConfiguration>,
    pub crds: Vec<CustomResourceDefinition>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub cert_manager: Vec<Value>,
    /// The Prometheus Operator's ServiceMonitor and PrometheusRule.
    pub monitoring: Vec<Value>,
    /// The run-span exporter's objects (component `exporter`), kept apart so the webhook's
    /// checks see the webhook's objects only.
    pub exporter: Option<Box<Install>>,
    /// The chart's hook that releases the exporter's finalizers (component
    /// `release-finalizers`), as rendered: no part of the install, checked on its own.
    pub release_hook: Vec<Value>,
}

impl Install {
    pub fn decode(objects: &[Value]) -> Install {
        let component =
            |o: &Value, c: &str| o["metadata"]["labels"]["app.kubernetes.io/component"] == c;
        let (release_hook, objects): (Vec<Value>, Vec<Value>) = objects
            .iter()
            .cloned()
            .partition(|o| component(o, "release-finalizers"));
        let (exporter, webhook): (Vec<Value>, Vec<Value>) =
            objects.into_iter().partition(|o| component(o, "exporter"));
        let mut install = Install::decode_all(&webhook);
        install.exporter = Some(Box::new(Install::decode_all(&exporter)));
        install.release_hook = release_hook;
        install
    }

    fn decode_all(objects: &[Value]) -> Install {
        let mut install = Install::default();
        for object in objects {
            let api_version = object["apiVersion"].as_str().unwrap_or_default();
            let kind = object["kind"].as_str().unwrap_or_default();
            match (api_version, kind) {
                ("v1", "Namespace") => install.namespaces.push(typed(object)),
                ("v1", "ServiceAccount") => install.service_accounts.push(typed(object)),
                ("apps/v1", "Deployment") => install.deployments.push(typed(object)),
                ("policy/v1", "PodDisruptionBudget") => install.pdbs.push(typed(object)),
                ("v1", "Service") => install.services.push(typed(object)),
                ("v1", "ConfigMap") => install.config_maps.push(typed(object)),
                ("v1", "Secret") => install.secrets.push(typed(object)),
                ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
                    install.webhook_configs.push(typed(object))
                }
                ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
                    install.validating_configs.push(typed(object))
                }
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    install.crds.push(typed(object))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    install.cluster_roles.push(typed(object))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    install.cluster_role_bindings.push(typed(object))
                }
                ("rbac.authorization.k8s.io/v1", "Role") => install.roles.push(typed(object)),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    install.role_bindings.push(typed(object))
                }
                ("cert-manager.io/v1", "Issuer" | "Certificate") => {
                    assert!(object["metadata"]["name"].is_string(), "{object}");
                    assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{object}");
                    assert!(object["spec"].is_object(), "{object}");
                    install.cert_manager.push(object.clone());
                }
                (
                    "monitoring.coreos.com/v1",
                    "ServiceMonitor" | "PodMonitor" | "PrometheusRule",
                ) => {
                    assert!(object["metadata"]["name"].is_string(), "{object}");
                    assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{object}");
                    assert!(object["spec"].is_object(), "{object}");
                    install.monitoring.push(object.clone());
                }
                _ => panic!("unexpected object {api_version} {kind}: {object}"),
            }
        }
        install
    }

    pub fn deployment(&self) -> &Deployment {
        assert_eq!(self.deployments.len(), 1);
        &self.deployments[0]
    }

    /// The pod template's spec of the Deployment.
    pub fn pod_spec(&self) -> &PodSpec {
        self.deployment()
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
    }

    pub fn container(&self) -> &Container {
        let containers = &self.pod_spec().containers;
        assert_eq!(containers.len(), 1);
        &containers[0]
    }

    pub fn service(&self) -> &Service {
        assert_eq!(self.services.len(), 1);
        &self.services[0]
    }

    pub fn service_ports(&self) -> &[ServicePort] {
        self.service()
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_deref()
            .unwrap()
    }

    pub fn webhook_config(&self) -> &MutatingWebhookConfiguration {
        assert_eq!(self.webhook_configs.len(), 1);
        &self.webhook_configs[0]
    }

    pub fn validating_config(&self) -> &ValidatingWebhookConfiguration {
        assert_eq!(self.validating_configs.len(), 1);
        &self.validating_configs[0]
    }

    /// Every webhook's client configuration, mutating and validating, by name.
    pub fn client_configs(&self) -> Vec<(String, &WebhookClientConfig)> {
        let mutating = self.webhook_config().webhooks.iter().flatten();
        let validating = self
            .validating_configs
            .iter()
            .flat_map(|c| c.webhooks.iter().flatten());
        mutating
            .map(|w| (w.name.clone(), &w.client_config))
            .chain(validating.map(|w| (w.name.clone(), &w.client_config)))
            .collect()
    }

    pub fn cert_manager(&self, kind: &str, name: &str) -> &Value {
        self.cert_manager
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }
}

/// The container's `--flag=value` arguments.
pub fn flags(container: &Container) -> BTreeMap<String, String> {
    let args = container.args.as_ref().expect("args");
    assert_eq!(args[0], "serve", "the container runs `serve`");
    args[1..]
        .iter()
        .map(|arg| {
            let (flag, value) = arg
                .strip_prefix("--")
                .and_then(|a| a.split_once('='))
                .unwrap_or_else(|| panic!("{arg}: write flags as --flag=value"));
            (flag.to_string(), value.to_string())
        })
        .collect()
}

pub fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Checks that hold for the base, whichever overlay provides the certificate.
pub fn check_common(install: &Install, expect: &Expect) {
    let selects_pods = pod_selector(install.deployment());

    // Namespace and ServiceAccount.
    if expect.namespace_object {
        assert_eq!(install.namespaces.len(), 1);
        assert_eq!(
            install.namespaces[0].metadata.name.as_deref(),
            Some(NAMESPACE)
        );
    } else {
        assert!(install.namespaces.is_empty(), "Helm creates no Namespace");
    }
    assert_eq!(install.service_accounts.len(), 1);
    let account = &install.service_accounts[0];
    // Only the webhook's own pods get the account's token (the Deployment asks for it).
    assert_eq!(account.automount_service_account_token, Some(false));

    // Deployment: two replicas, the ServiceAccount, spread, restricted security context.
    let deployment = install.deployment();
    assert_eq!(deployment.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(expect.replicas));
    assert!(selects_pods(spec.selector.match_labels.as_ref().unwrap()));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(pod.automount_service_account_token, Some(true));
    let spread = pod
        .topology_spread_constraints
        .as_ref()
        .expect("topology spread");
    assert!(
        spread
            .iter()
            .any(|c| c.topology_key == "kubernetes.io/hostname")
    );
    for constraint in spread {
        let selector = constraint.label_selector.as_ref().unwrap();
        assert!(selects_pods(selector.match_labels.as_ref().unwrap()));
    }
    let pod_security = pod.security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    // Not root, and the user the image itself declares (the kubelet checks runAsNonRoot only
    // against a numeric user).
    let user = pod_security.run_as_user.expect("runAsUser");
    let group = pod_security.run_as_group.expect("runAsGroup");
    assert!(user != 0 && group != 0, "runs as root");
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let image_user = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .expect("the Dockerfile sets USER");
    assert_eq!(image_user.trim(), format!("{user}:{group}"));
    assert_eq!(
        pod_security.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );

    let container = install.container();
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(
        security.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let resources = container.resources.as_ref().unwrap();
    for key in ["cpu", "memory"] {
        assert!(
            resources.requests.as_ref().unwrap().contains_key(key),
            "request {key}"
        );
        assert!(
            resources.limits.as_ref().unwrap().contains_key(key),
            "limit {key}"
        );
    }

    // Ports: the container listens where --listen says, and the Service reaches it.
    let flags = flags(container);
    let container_port = |name: &str| {
        container
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("container port {name}"))
            .container_port
    };
    assert_eq!(container_port("https"), 8443);
    assert_eq!(port_of(&flags["listen"]), container_port("https"));
    assert_eq!(port_of(&flags["metrics-listen"]), container_port("metrics"));

    // Probes: the server's health routes, over HTTPS on the serving port.
    for (probe, path) in [
        (container.readiness_probe.as_ref(), "/readyz"),
        (container.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe.and_then(|p| p.http_get.as_ref()).expect(path);
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
        assert_eq!(get.port, IntOrString::String("https".into()));
    }

    // PodDisruptionBudget over the same pods.
    check_pdb(&install.pdbs, &selects_pods, Keeps::One);

    // Service: selects the pods; 443 → https (8443) and the metrics port.
    let service = install.service();
    assert_eq!(service.metadata.name.as_deref(), Some(SERVICE));
    assert_eq!(service.metadata.namespace.as_deref(), Some(NAMESPACE));
    let service_spec = service.spec.as_ref().unwrap();
    assert!(selects_pods(service_spec.selector.as_ref().unwrap()));
    let service_ports = service_spec.ports.as_ref().unwrap();
    let target = |port: i32| {
        let p = service_ports.iter().find(|p| p.port == port).unwrap();
        match p.target_port.as_ref().unwrap() {
            IntOrString::Int(n) => *n,
            IntOrString::String(name) => container_port(name),
        }
    };
    assert_eq!(target(443), 8443);
    assert!(service_ports.iter().any(
        |p| p.name.as_deref() == Some("metrics") && target(p.port) == container_port("metrics")
    ));

    // Mounted files: whole directories (kubelet never updates subPath mounts, so reloads would
    // never happen), and the paths the flags name are inside them.
    let volumes = pod.volumes.as_ref().unwrap();
    let mounts = container.volume_mounts.as_ref().unwrap();
    assert!(
        mounts
            .iter()
            .all(|m| m.sub_path.is_none() && m.sub_path_expr.is_none())
    );
    let mount_of = |file: &str| {
        let path = Path::new(file);
        let mount = mounts
            .iter()
            .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
            .unwrap_or_else(|| panic!("{file} is not in a mounted directory"));
        assert_eq!(mount.read_only, Some(true));
        let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
        (
            volume.clone(),
            path.file_name().unwrap().to_str().unwrap().to_string(),
        )
    };
    let (tls_cert, cert_file) = mount_of(&flags["tls-cert"]);
    let (tls_key, key_file) = mount_of(&flags["tls-key"]);
    assert_eq!(tls_cert, tls_key);
    assert_eq!(
        (cert_file.as_str(), key_file.as_str()),
        ("tls.crt", "tls.key")
    );
    let tls_secret = tls_cert
        .secret
        .as_ref()
        .unwrap()
        .secret_name
        .as_deref()
        .unwrap();
    assert_eq!(tls_secret, expect.tls_secret);
    let (policy_volume, policy_file) = mount_of(&flags["policy"]);
    let policy_map_name = policy_volume.config_map.as_ref().unwrap().name.clone();
    let policy_map = install
        .config_maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(policy_map_name.as_str()))
        .expect("the mounted policy ConfigMap is part of the install");
    let policy_text = &policy_map.data.as_ref().unwrap()[&policy_file];
    // With the exporter the chart turns run spans on (`runSpans: {enabled: true}`, and nothing
    // else); the rest is the embedded default, field for field.
    let mut policy_doc: serde_json::Map<String, Value> =
        serde_norway::from_str(policy_text).unwrap();
    let run_spans = policy_doc.remove("runSpans");
    match expect.exporter {
        Some(_) => assert_eq!(
            run_spans,
            Some(serde_json::json!({"enabled": true})),
            "the exporter's install turns run spans on in the policy, and only that"
        ),
        None => assert_eq!(run_spans, None, "run spans on without the exporter"),
    }
    assert_eq!(
        Policy::from_yaml(&serde_json::to_string(&policy_doc).unwrap()).unwrap(),
        Policy::embedded_default(),
        "the policy ConfigMap (the chart's values.yaml `policy`) drifted from src/policy/default-policy.yaml"
    );

    // The server watches TracingPolicies and namespaces, with the RBAC for exactly that.
    assert_eq!(flags["watch-tracing-policies"], "true");
    check_rbac(install, account);
    check_crd(install);

    // No token anywhere in the install unless asked for (the chart's token.create), and then
    // only the Secret the policy names, in the namespaces given.
    let token = Policy::from_yaml(policy_text).unwrap().token;
    let mut token_namespaces = Vec::new();
    for secret in &install.secrets {
        if secret.type_.as_deref() == Some("kubernetes.io/tls") {
            assert_eq!(secret.metadata.namespace.as_deref(), Some(NAMESPACE));
            continue;
        }
        let token = token
            .as_ref()
            .expect("a token Secret, but the policy names none");
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        assert_eq!(secret.metadata.name.as_ref(), Some(&token.secret_name));
        let data = secret.data.as_ref().expect("token data");
        assert_eq!(data.keys().collect::<Vec<_>>(), [&token.secret_key]);
        token_namespaces.push(secret.metadata.namespace.clone().unwrap());
    }
    assert_eq!(token_namespaces, expect.token_namespaces);

    check_webhooks(install, expect);
    if expect.validating {
        check_validating_webhooks(install, &policy_map_name, &policy_file);
    } else {
        assert!(install.validating_configs.is_empty());
    }
    check_exporter(install, expect, &policy_map_name);
}

/// The run-span exporter: its Deployment runs `export` with the same hardening as the
/// webhook's, reads the webhook's policy ConfigMap and the token Secret as mounted files, and
/// its RBAC grants exactly what `export` asks the API server for (tests/export.rs checks each
/// request against these rules); nothing on Secrets.
pub fn check_exporter(install: &Install, expect: &Expect, policy_map: &str) {
    let exporter = install
        .exporter
        .as_deref()
        .expect("decoded with Install::decode");
    let Some(replicas) = expect.exporter else {
        let objects = exporter.service_accounts.len()
            + exporter.deployments.len()
            + exporter.pdbs.len()
            + exporter.cluster_roles.len()
            + exporter.cluster_role_bindings.len()
            + exporter.roles.len()
            + exporter.role_bindings.len();
        assert_eq!(objects, 0, "exporter objects with the exporter off");
        return;
    };
    assert_eq!(exporter.service_accounts.len(), 1);
    let account = &exporter.service_accounts[0];
    assert_eq!(account.automount_service_account_token, Some(false));
    let deployment = exporter.deployment();
    assert_eq!(deployment.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(replicas));
    let selects_pods = pod_selector(deployment);
    assert!(selects_pods(spec.selector.match_labels.as_ref().unwrap()));
    let webhook_labels = install
        .deployment()
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone();
    assert_ne!(
        spec.selector.match_labels, webhook_labels,
        "selectors must not overlap"
    );
    let pod = exporter.pod_spec();
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(pod.automount_service_account_token, Some(true));
    // The same hardening as the webhook's pods.
    assert_eq!(pod.security_context, install.pod_spec().security_context);
    let container = exporter.container();
    assert_eq!(
        container.security_context,
        install.container().security_context
    );
    assert_eq!(container.image, install.container().image);
    let resources = container.resources.as_ref().unwrap();
    for key in ["cpu", "memory"] {
        assert!(resources.requests.as_ref().unwrap().contains_key(key));
        assert!(resources.limits.as_ref().unwrap().contains_key(key));
    }
    let args = container.args.as_ref().unwrap();
    assert_eq!(args[0], "export", "the exporter runs `export`");
    let flags: BTreeMap<String, String> = args[1..]
        .iter()
        .map(|arg| {
            let (flag, value) = arg
                .strip_prefix("--")
                .and_then(|a| a.split_once('='))
                .unwrap();
            (flag.to_string(), value.to_string())
        })
        .collect();
    assert_eq!(flags["watch-tracing-policies"], "true");
    assert_eq!(flags["namespace-label"], "lightstep-tekton.io/inject");
    let metrics_port = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap()
        .container_port;
    assert_eq!(port_of(&flags["metrics-listen"]), metrics_port);
    for (probe, path) in [
        (container.readiness_probe.as_ref(), "/readyz"),
        (container.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe.and_then(|p| p.http_get.as_ref()).expect(path);
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.scheme.as_deref(), Some("HTTP"));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
    }
    // The files it reads are in whole-directory mounts: the webhook's policy ConfigMap, and the
    // policy's token Secret (in the install's namespace).
    let volumes = pod.volumes.as_ref().unwrap();
    let mounts = container.volume_mounts.as_ref().unwrap();
    let volume_of = |file: &str| {
        let path = Path::new(file);
        let mount = mounts
            .iter()
            .find(|m| path.parent() == Some(Path::new(&m.mount_path)) && m.sub_path.is_none())
            .unwrap_or_else(|| panic!("{file} is not in a mounted directory"));
        assert_eq!(mount.read_only, Some(true));
        volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap()
            .clone()
    };
    let policy = volume_of(&flags["policy"]);
    assert_eq!(policy.config_map.as_ref().unwrap().name, policy_map);
    let token = Policy::embedded_default().token.unwrap();
    let token_file = &flags["token-file"];
    assert!(
        token_file.ends_with(&format!("/{}", token.secret_key)),
        "{token_file}"
    );
    let secret = volume_of(token_file).secret.unwrap();
    assert_eq!(
        secret.secret_name.as_deref(),
        Some(token.secret_name.as_str())
    );
    let env = container.env.clone().unwrap_or_default();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = env.iter().find(|e| e.name == name).unwrap();
        let from = var.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(from.map(|f| f.field_path.as_str()), Some(field), "{name}");
    }

    // RBAC: exactly what `export` uses.
    let rule = |groups: &str, resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![groups.to_string()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    assert_eq!(exporter.cluster_roles.len(), 1);
    let role = &exporter.cluster_roles[0];
    assert_eq!(
        role.rules.as_ref().unwrap(),
        &vec![
            rule(
                "tekton.dev",
                &["pipelineruns", "taskruns"],
                &["get", "list", "watch", "patch"]
            ),
            rule("", &["namespaces"], &["get", "list", "watch"]),
            rule(
                resource::GROUP,
                &[resource::PLURAL],
                &["get", "list", "watch"]
            ),
        ],
        "charts/lightstep-tekton-webhook/templates/exporter.yaml: the ClusterRole must grant exactly what the exporter uses"
    );
    let everything = serde_json::to_string(role).unwrap();
    assert!(!everything.contains("secrets") && !everything.contains('*'));
    assert_eq!(exporter.roles.len(), 1);
    let lease = |names: Option<&[&str]>, verbs: &[&str]| PolicyRule {
        resource_names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
        ..rule("coordination.k8s.io", &["leases"], verbs)
    };
    assert_eq!(
        exporter.roles[0].rules.as_ref().unwrap(),
        &vec![
            lease(None, &["create"]),
            lease(Some(&[cluster::EXPORTER_LEASE]), &["get", "update"]),
        ]
    );
    assert_eq!(
        exporter.roles[0].metadata.namespace.as_deref(),
        Some(NAMESPACE)
    );
    for (binding_role, subjects) in exporter
        .cluster_role_bindings
        .iter()
        .map(|b| (&b.role_ref, &b.subjects))
        .chain(
            exporter
                .role_bindings
                .iter()
                .map(|b| (&b.role_ref, &b.subjects)),
        )
    {
        let names = [
            role.metadata.name.as_ref(),
            exporter.roles[0].metadata.name.as_ref(),
        ];
        assert!(names.contains(&Some(&binding_role.name)));
        let subjects = subjects.as_ref().unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    }
    assert_eq!(exporter.cluster_role_bindings.len(), 1);
    assert_eq!(exporter.role_bindings.len(), 1);

    // A PodDisruptionBudget lets one replica go at a time (a single replica never blocks a
    // drain: a standby is a convenience, not a requirement).
    check_pdb(&exporter.pdbs, &selects_pods, Keeps::AllButOne);
    let args = exporter.container().args.clone().unwrap_or_default();
    for flag in [
        "--concurrency=",
        "--queue-capacity=",
        "--child-grace=",
        "--rescan-interval=",
        "--max-rejections=",
        "--max-request-bytes=",
        "--mark-qps=",
        "--store-deadline=",
    ] {
        assert!(
            args.iter().any(|a| a.starts_with(flag)),
            "{flag} in {args:?}"
        );
    }
}

/// Whether a selector picks a Deployment's pods: a non-empty subset of their labels.
fn pod_selector(deployment: &Deployment) -> impl Fn(&BTreeMap<String, String>) -> bool {
    let template = &deployment.spec.as_ref().unwrap().template;
    let pod_labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    move |selector| {
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    }
}

/// What a PodDisruptionBudget keeps through drains.
enum Keeps {
    /// `minAvailable: 1`.
    One,
    /// `maxUnavailable: 1`.
    AllButOne,
}

/// One PodDisruptionBudget, over the component's pods, keeping what `keeps` says.
fn check_pdb(
    pdbs: &[PodDisruptionBudget],
    selects_pods: &dyn Fn(&BTreeMap<String, String>) -> bool,
    keeps: Keeps,
) {
    assert_eq!(pdbs.len(), 1);
    let pdb = pdbs[0].spec.as_ref().unwrap();
    let selector = pdb
        .selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    assert!(selects_pods(selector));
    match keeps {
        Keeps::One => assert_eq!(pdb.min_available, Some(IntOrString::Int(1))),
        Keeps::AllButOne => {
            assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
            assert_eq!(pdb.min_available, None);
        }
    }
}

/// The ClusterRole grants what the watch caches and the status writer use, nothing else (above
/// all nothing on Secrets), and is bound to the webhook's ServiceAccount only.
pub fn check_rbac(install: &Install, account: &ServiceAccount) {
    assert_eq!(install.cluster_roles.len(), 1);
    let role = &install.cluster_roles[0];
    let rule = |group: &str, resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(vec![resource.to_string()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    let status = format!("{}/status", resource::PLURAL);
    let expected = vec![
        rule("", "namespaces", &["get", "list", "watch"]),
        rule(resource::GROUP, resource::PLURAL, &["get", "list", "watch"]),
        rule(resource::GROUP, &status, &["update"]),
    ];
    assert_eq!(
        role.rules.as_ref().unwrap(),
        &expected,
        "charts/lightstep-tekton-webhook/templates/rbac.yaml: the ClusterRole must grant exactly what the webhook uses"
    );
    assert!(role.aggregation_rule.is_none());
    let everything = serde_json::to_string(role).unwrap();
    assert!(!everything.contains("secrets") && !everything.contains('*'));

    assert_eq!(install.cluster_role_bindings.len(), 1);
    let binding = &install.cluster_role_bindings[0];
    check_binding(
        &binding.role_ref,
        &binding.subjects,
        ("ClusterRole", &role.metadata),
        account,
    );

    check_lease_rbac(install, account);
}

/// A binding refers to `role` (its kind and metadata) and grants it to the webhook's
/// ServiceAccount alone.
fn check_binding(
    role_ref: &RoleRef,
    subjects: &Option<Vec<Subject>>,
    (kind, role): (&str, &ObjectMeta),
    account: &ServiceAccount,
) {
    assert_eq!(role_ref.kind, kind);
    assert_eq!(role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&role_ref.name), role.name.as_ref());
    let subjects = subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
}

/// The Role grants the Lease that elects the status writer, in the install's namespace and by
/// name, and nothing else; it is bound to the webhook's ServiceAccount only.
fn check_lease_rbac(install: &Install, account: &ServiceAccount) {
    assert_eq!(install.roles.len(), 1);
    let role = &install.roles[0];
    assert_eq!(role.metadata.namespace, account.metadata.namespace);
    let leases = |names: Option<&[&str]>, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".to_string()]),
        resources: Some(vec!["leases".to_string()]),
        resource_names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    let expected = vec![
        leases(None, &["create"]),
        leases(Some(&[cluster::WEBHOOK_LEASE]), &["get", "update"]),
    ];
    assert_eq!(
        role.rules.as_ref().unwrap(),
        &expected,
        "charts/lightstep-tekton-webhook/templates/rbac.yaml: the Role must grant exactly the webhook's Lease"
    );

    assert_eq!(install.role_bindings.len(), 1);
    let binding = &install.role_bindings[0];
    assert_eq!(binding.metadata.namespace, account.metadata.namespace);
    check_binding(
        &binding.role_ref,
        &binding.subjects,
        ("Role", &role.metadata),
        account,
    );

    // The Lease's namespace and holder come from the downward API.
    let container = &install.deployments[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod spec")
        .containers[0];
    let env = container.env.clone().unwrap_or_default();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = env
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        let from = var.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(from.map(|f| f.field_path.as_str()), Some(field), "{name}");
    }
}

/// The installed CRD is the one the code generates, names what the code and the RBAC use, and
/// is a structural schema (the API server refuses a v1 CRD whose schema is not).
pub fn check_crd(install: &Install) {
    assert_eq!(install.crds.len(), 1);
    let crd = &install.crds[0];
    assert_eq!(
        crd,
        &resource::crd(),
        "charts/lightstep-tekton-webhook/crds/crd-tracingpolicy.yaml (and its rendering in \
         manifests/base) differs from the code; regenerate both with `make crd`"
    );
    let spec = &crd.spec;
    assert_eq!(spec.group, resource::GROUP);
    assert_eq!(spec.names.plural, resource::PLURAL);
    assert_eq!(spec.names.kind, resource::KIND);
    assert_eq!(spec.scope, "Cluster");
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some(format!("{}.{}", resource::PLURAL, resource::GROUP).as_str())
    );
    assert_eq!(spec.versions.len(), 1);
    let version = &spec.versions[0];
    assert_eq!(version.name, resource::VERSION);
    assert!(version.served && version.storage);
    assert!(
        version.subresources.as_ref().unwrap().status.is_some(),
        "status is a subresource: the RBAC grants update on tracingpolicies/status only"
    );
    {
        use kube::Resource as _;
        assert_eq!(TracingPolicy::group(&()), resource::GROUP);
        assert_eq!(TracingPolicy::plural(&()), resource::PLURAL);
        assert_eq!(TracingPolicy::version(&()), resource::VERSION);
    }
    let schema = serde_json::to_value(
        version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    check_structural(&schema, "openAPIV3Schema", true);
}

/// The rules of a structural schema that a generated schema could break (Kubernetes'
/// apiextensions validation): every node has a type, `properties` and `additionalProperties`
/// are not combined, and no `anyOf`/`oneOf`/`allOf`/`not` carries types, defaults or nullability.
pub fn check_structural(node: &Value, at: &str, typed_required: bool) {
    let object = node
        .as_object()
        .unwrap_or_else(|| panic!("{at}: not an object"));
    let preserves = object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || object.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if typed_required && !preserves {
        assert!(object.contains_key("type"), "{at}: no type");
    }
    assert!(
        !(object.contains_key("properties") && object.contains_key("additionalProperties")),
        "{at}: properties and additionalProperties together"
    );
    assert_ne!(
        object.get("additionalProperties"),
        Some(&Value::Bool(false)),
        "{at}: additionalProperties: false"
    );
    if let Some(values) = object.get("enum") {
        assert!(
            values.as_array().unwrap().iter().all(|v| !v.is_null()),
            "{at}: null in enum"
        );
    }
    for key in ["$ref", "definitions", "$schema"] {
        assert!(!object.contains_key(key), "{at}: {key}");
    }
    for (key, child) in object {
        match key.as_str() {
            "properties" => {
                for (name, property) in child.as_object().unwrap() {
                    check_structural(property, &format!("{at}.{name}"), typed_required);
                }
            }
            "items" | "additionalProperties" if child.is_object() => {
                check_structural(child, &format!("{at}[]"), typed_required)
            }
            "anyOf" | "oneOf" | "allOf" => {
                for (i, branch) in child.as_array().unwrap().iter().enumerate() {
                    let branch_at = format!("{at}.{key}[{i}]");
                    for banned in ["type", "nullable", "default", "additionalProperties"] {
                        assert!(branch.get(banned).is_none(), "{branch_at}: {banned}");
                    }
                    check_structural(branch, &branch_at, false);
                }
            }
            _ => {}
        }
    }
}

pub fn check_webhooks(install: &Install, expect: &Expect) {
    let config = install.webhook_config();
    let webhooks = config.webhooks.as_ref().unwrap();
    assert_eq!(webhooks.len(), expect.webhooks.len());
    for (webhook, (name, label, path, failure_policy)) in webhooks.iter().zip(&expect.webhooks) {
        check_webhook(install, expect, webhook, name, label, path, failure_policy);
    }
    if expect.webhooks.len() == WEBHOOKS.len() {
        let names: Vec<&str> = webhooks.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            certs::WEBHOOK_NAMES,
            "the caBundle patch `certs` writes names every webhook"
        );
    }
    assert_eq!(
        config.metadata.name.as_deref(),
        Some(certs::WEBHOOK_CONFIGURATION)
    );
}

pub fn check_webhook(
    install: &Install,
    expect: &Expect,
    webhook: &MutatingWebhook,
    name: &str,
    label: &str,
    path: &str,
    failure_policy: &str,
) {
    assert_eq!(webhook.name, name);
    let service_ref = webhook.client_config.service.as_ref().unwrap();
    let service = install.service();
    assert_eq!(
        Some(&service_ref.name),
        service.metadata.name.as_ref(),
        "{name}"
    );
    assert_eq!(
        Some(&service_ref.namespace),
        service.metadata.namespace.as_ref(),
        "{name}"
    );
    let port = service_ref.port.unwrap_or(443);
    assert!(
        install
            .service_ports()
            .iter()
            .any(|p| p.port == port && p.name.as_deref() == Some("https")),
        "{name}: port {port} is the Service's https port"
    );
    assert_eq!(service_ref.path.as_deref(), Some(path), "{name}");
    assert!(webhook.client_config.url.is_none());

    let rules = webhook.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1, "{name}");
    let rule = &rules[0];
    assert_eq!(rule.api_groups.as_deref(), Some(&["".to_string()][..]));
    assert_eq!(rule.api_versions.as_deref(), Some(&["v1".to_string()][..]));
    assert_eq!(
        rule.operations.as_deref(),
        Some(&["CREATE".to_string()][..])
    );
    assert_eq!(rule.resources.as_deref(), Some(&["pods".to_string()][..]));

    let never_here = LabelSelectorRequirement {
        key: "kubernetes.io/metadata.name".into(),
        operator: "NotIn".into(),
        values: Some(
            [NAMESPACE.to_string(), "kube-system".to_string()]
                .into_iter()
                .chain(expect.excluded_namespaces.iter().cloned())
                .collect(),
        ),
    };
    assert_eq!(
        webhook.namespace_selector,
        Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "lightstep-tekton.io/inject".to_string(),
                label.to_string()
            )])),
            match_expressions: Some(vec![never_here]),
        }),
        "{name}"
    );
    assert_eq!(
        webhook.object_selector,
        Some(LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tekton.dev/taskRun".into(),
                operator: "Exists".into(),
                values: None,
            }]),
        }),
        "{name}"
    );
    assert_eq!(webhook.side_effects, "None");
    assert_eq!(webhook.admission_review_versions, ["v1"]);
    assert!(matches!(webhook.timeout_seconds, Some(2..=3)), "{name}");
    assert_eq!(webhook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(
        webhook.failure_policy.as_deref(),
        Some(failure_policy),
        "{name}"
    );
}

/// Whether `labels` satisfy `selector`, as the API server matches a webhook's selectors (a
/// missing selector matches everything).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            other => panic!("operator {other}"),
        }
    });
    labels_match && expressions_match
}

/// The validating webhooks: `/validate` on the same Service, CREATE and UPDATE only,
/// failurePolicy Ignore; one for the mounted policy ConfigMap alone (by its label, in the
/// install's namespace), one for TracingPolicies (not their status).
pub fn check_validating_webhooks(install: &Install, policy_map: &str, policy_key: &str) {
    let config = install.validating_config();
    assert_eq!(
        config.metadata.name.as_deref(),
        Some(certs::WEBHOOK_CONFIGURATION)
    );
    let webhooks = config.webhooks.as_ref().unwrap();
    let names: Vec<&str> = webhooks.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        names,
        certs::VALIDATING_WEBHOOK_NAMES,
        "the caBundle patch `certs` writes names every validating webhook"
    );
    let service = install.service();
    let writes = Some(vec!["CREATE".to_string(), "UPDATE".to_string()]);
    for webhook in webhooks {
        let name = &webhook.name;
        let service_ref = webhook.client_config.service.as_ref().unwrap();
        assert_eq!(Some(&service_ref.name), service.metadata.name.as_ref());
        assert_eq!(
            Some(&service_ref.namespace),
            service.metadata.namespace.as_ref()
        );
        assert_eq!(service_ref.port.unwrap_or(443), 443, "{name}");
        assert_eq!(service_ref.path.as_deref(), Some("/validate"), "{name}");
        assert!(webhook.client_config.url.is_none());
        // Refusing edits while the webhook is down would block the repair of an install; see
        // the manifest's comment and docs/security.md.
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"), "{name}");
        assert_eq!(webhook.side_effects, "None");
        assert_eq!(webhook.admission_review_versions, ["v1"]);
        assert!(matches!(webhook.timeout_seconds, Some(1..=5)), "{name}");
        // Not known to every API server the README supports (GA in 1.30).
        assert!(webhook.match_conditions.is_none(), "{name}");
        let rules = webhook.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 1, "{name}");
        assert_eq!(rules[0].operations, writes, "{name}: never DELETE");
    }
    let (policy, tracing_policies): (&ValidatingWebhook, &ValidatingWebhook) =
        (&webhooks[0], &webhooks[1]);

    // The policy ConfigMap: what the Deployment mounts carries the label, nothing else does.
    let rule = &policy.rules.as_ref().unwrap()[0];
    assert_eq!(rule.api_groups.as_deref(), Some(&["".to_string()][..]));
    assert_eq!(rule.api_versions.as_deref(), Some(&["v1".to_string()][..]));
    assert_eq!(
        rule.resources.as_deref(),
        Some(&["configmaps".to_string()][..])
    );
    assert_eq!(
        policy_key, POLICY_KEY,
        "the key /validate reads is the file --policy names"
    );
    for map in &install.config_maps {
        let labels = map.metadata.labels.clone().unwrap_or_default();
        let is_policy = map.metadata.name.as_deref() == Some(policy_map);
        assert_eq!(
            selects(policy.object_selector.as_ref(), &labels),
            is_policy,
            "{:?}",
            map.metadata.name
        );
        assert_eq!(labels.contains_key(POLICY_LABEL), is_policy);
    }
    let other_map = BTreeMap::from([("app".to_string(), "other".to_string())]);
    assert!(!selects(policy.object_selector.as_ref(), &other_map));
    // Namespaces as the API server labels them (kubernetes.io/metadata.name, from 1.22).
    let namespace = |name: &str| {
        BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())])
    };
    assert!(selects(
        policy.namespace_selector.as_ref(),
        &namespace(NAMESPACE)
    ));
    for elsewhere in ["default", "kube-system", "tekton-pipelines"] {
        assert!(
            !selects(policy.namespace_selector.as_ref(), &namespace(elsewhere)),
            "{elsewhere}"
        );
    }
    if let Some(namespace) = install.namespaces.first() {
        assert_eq!(namespace.metadata.name.as_deref(), Some(NAMESPACE));
    }

    // TracingPolicies: every one (cluster-scoped, so no namespace selector applies), the
    // resource itself and not its status, which the webhook writes.
    let rule = &tracing_policies.rules.as_ref().unwrap()[0];
    assert_eq!(
        rule.api_groups.as_deref(),
        Some(&[resource::GROUP.to_string()][..])
    );
    assert_eq!(
        rule.api_versions.as_deref(),
        Some(&[resource::VERSION.to_string()][..])
    );
    assert_eq!(
        rule.resources.as_deref(),
        Some(&[resource::PLURAL.to_string()][..])
    );
    assert_eq!(rule.scope.as_deref(), Some("Cluster"));
    assert!(tracing_policies.object_selector.is_none());
}

pub fn verify(ca_pems: &[u8], cert_pem: &[u8], name: &str) -> Result<(), webpki::Error> {
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pems)
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!cas.is_empty());
    let anchors: Vec<_> = cas
        .iter()
        .map(|ca| webpki::anchor_from_trusted_cert(ca).unwrap())
        .collect();
    let leaf = CertificateDer::from_pem_slice(cert_pem).unwrap();
    let cert = webpki::EndEntityCert::try_from(&leaf)?;
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )?;
    cert.verify_is_valid_for_subject_name(&ServerName::try_from(name.to_string()).unwrap())
}

/// The binary, started with the Deployment's own arguments (mount paths mapped to a temp
/// directory holding the Secret's and ConfigMap's files), killed on drop.
pub struct Served {
    pub child: std::process::Child,
    pub https: std::net::SocketAddr,
    pub metrics: std::net::SocketAddr,
    pub log: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve_like_the_deployment(install: &Install, tmp: &TempDir) -> Served {
    let container = install.container();
    let pod = install.pod_spec();
    // Materialize each mounted volume the way kubelet would: one file per key.
    let mut mapped = Vec::new();
    for mount in container.volume_mounts.as_ref().unwrap() {
        let volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap();
        let dir = tmp.0.join("volumes").join(&mount.name);
        fs::create_dir_all(&dir).unwrap();
        if let Some(source) = &volume.secret {
            let name = source.secret_name.as_deref().unwrap();
            let secret = install
                .secrets
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("Secret {name} is mounted but not installed"));
            for (key, value) in secret.data.as_ref().unwrap() {
                fs::write(dir.join(key), &value.0).unwrap();
            }
        }
        if let Some(source) = &volume.config_map {
            let map = install
                .config_maps
                .iter()
                .find(|m| m.metadata.name.as_deref() == Some(source.name.as_str()))
                .unwrap();
            for (key, value) in map.data.as_ref().unwrap() {
                fs::write(dir.join(key), value).unwrap();
            }
        }
        mapped.push((mount.mount_path.clone(), dir));
    }
    let (https, metrics) = (free_port(), free_port());
    let args: Vec<String> = container
        .args
        .as_ref()
        .unwrap()
        .iter()
        .map(|arg| {
            if arg.starts_with("--listen=") {
                return format!("--listen={https}");
            }
            if arg.starts_with("--metrics-listen=") {
                return format!("--metrics-listen={metrics}");
            }
            // There is no API server here; tests/cluster.rs covers the watch caches.
            if arg.starts_with("--watch-tracing-policies=") {
                return "--watch-tracing-policies=false".to_string();
            }
            let mut arg = arg.clone();
            for (mount_path, dir) in &mapped {
                arg = arg.replace(&format!("={mount_path}/"), &format!("={}/", dir.display()));
            }
            arg
        })
        .collect();
    let log = tmp.0.join("serve.log");
    let child = Command::new(BIN)
        .args(&args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Served {
        child,
        https,
        metrics,
        log,
    }
}

/// The cert-manager objects (overlay or chart's certs.mode=cert-manager): the serving
/// certificate names the Service and lands in the Secret the Deployment mounts, the CA chain
/// leads to a self-signed root, and the injector (not a hand-set caBundle) fills the webhooks.
pub fn check_cert_manager(install: &Install) {
    // The serving certificate: the Service's names, in the Secret the Deployment mounts,
    // issued by the CA issuer, whose CA the injector puts into the caBundle.
    let serving = install.cert_manager("Certificate", SERVICE);
    let dns_names: Vec<String> =
        serde_json::from_value(serving["spec"]["dnsNames"].clone()).unwrap();
    assert_eq!(dns_names, certs::service_dns_names(SERVICE, NAMESPACE));
    assert_eq!(
        serving["spec"]["secretName"],
        "lightstep-tekton-webhook-tls"
    );
    let ca_issuer_name = serving["spec"]["issuerRef"]["name"].as_str().unwrap();
    let ca_issuer = install.cert_manager("Issuer", ca_issuer_name);
    let ca_secret = &ca_issuer["spec"]["ca"]["secretName"];
    let ca = install
        .cert_manager
        .iter()
        .find(|o| o["kind"] == "Certificate" && o["spec"]["secretName"] == *ca_secret)
        .expect("a Certificate makes the CA issuer's secret");
    assert_eq!(ca["spec"]["isCA"], true);
    let root = install.cert_manager("Issuer", ca["spec"]["issuerRef"]["name"].as_str().unwrap());
    assert!(root["spec"]["selfSigned"].is_object());

    let inject_from = format!("{NAMESPACE}/{SERVICE}");
    let config = install.webhook_config();
    let annotations = config.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations["cert-manager.io/inject-ca-from"], inject_from);
    for validating in &install.validating_configs {
        let annotations = validating.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["cert-manager.io/inject-ca-from"], inject_from);
    }
    // The injector fills the caBundle; one set by hand would fight it.
    for (name, client) in install.client_configs() {
        assert!(client.ca_bundle.is_none(), "{name}");
    }
}
