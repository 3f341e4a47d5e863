//! The install, as a platform team applies it: both overlays built by `kubectl kustomize`, every
//! object checked against its Kubernetes schema, and the pieces checked against each other and
//! against the binary (the Service the webhooks call, the ports, the mounted files the server
//! reads, the certificates `certs` makes). A cluster would find a mismatch only at admission
//! time, as failed TaskRuns; these tests find it before.
//!
//! The TracingPolicy CRD is checked against the code that generates it (and that it is a
//! structural schema the API server accepts), and the RBAC against what the code needs.
//!
//! manifests/base is a rendering of the Helm chart (tests/chart.rs checks it is current); the
//! checks themselves live in tests/support/install.rs, shared with the chart's suite.
//!
//! kubectl comes from `$KUBECTL` (default `kubectl`); `.ci/run` installs it on a fresh machine.

mod support {
    pub mod http;
    pub mod install;
    pub mod poll;
    pub mod release_hook;
    pub mod tmp;
}

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use lightstep_tekton_webhook::admission::validate::{POLICY_KEY, POLICY_LABEL};
use lightstep_tekton_webhook::certs;
use lightstep_tekton_webhook::policy::Policy;
use lightstep_tekton_webhook::policy::resource;
use serde_json::Value;
use support::http::{client_config, request};
use support::install::*;
use support::poll::eventually_blocking;
use support::release_hook::check_release_hook;
use support::tmp::TempDir;

fn manifests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// A copy of manifests/ without any certificates a developer made locally.
fn manifests_copy(tmp: &TempDir) -> PathBuf {
    let copy = tmp.0.join("manifests");
    copy_tree(&manifests_dir(), &copy);
    let _ = fs::remove_dir_all(copy.join("overlays/self-signed/certs"));
    copy
}

fn run_certs(out: &Path, extra: &[&str]) {
    let output = Command::new(BIN)
        .args([
            "certs",
            "--service",
            SERVICE,
            "--namespace",
            NAMESPACE,
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "certs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `kubectl kustomize DIR`, parsed into one JSON value per object.
fn kustomize(dir: &Path) -> Vec<Value> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string());
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("{kubectl}: {e}; install kubectl (Debian: apt-get install kubernetes-client)")
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let objects = parse_objects(&String::from_utf8(output.stdout).unwrap());
    assert!(!objects.is_empty(), "{} rendered nothing", dir.display());
    objects
}

fn render_cert_manager() -> Vec<Value> {
    let tmp = TempDir::new("cm");
    kustomize(&manifests_copy(&tmp).join("overlays/cert-manager"))
}

/// The self-signed overlay, with certificates made by the `certs` command, and where they are.
fn render_self_signed(tmp: &TempDir) -> (Vec<Value>, PathBuf) {
    let overlay = manifests_copy(tmp).join("overlays/self-signed");
    let certs_dir = overlay.join("certs");
    run_certs(&certs_dir, &[]);
    (kustomize(&overlay), certs_dir)
}

/// What `make undeploy` runs once the exporter is stopped: manifests/uninstall builds, and its
/// Job releases the finalizers with the install's image and hardening and RBAC of its own.
#[test]
fn the_uninstall_job_builds_and_matches_the_install() {
    let tmp = TempDir::new("uninstall");
    let mut install = Install::decode(&kustomize(
        &manifests_copy(&tmp).join("overlays/cert-manager"),
    ));
    assert!(
        install.release_hook.is_empty(),
        "the release Job is no part of the install"
    );
    install.release_hook = kustomize(&manifests_copy(&tmp).join("uninstall"));
    check_release_hook(&install, "post-delete");
    let makefile = fs::read_to_string(manifests_dir().join("../Makefile")).unwrap();
    let undeploy = &makefile[makefile.find("\nundeploy:").unwrap()..];
    let undeploy = &undeploy[..undeploy.find("\n\n").unwrap()];
    let order: Vec<usize> = [
        "delete --ignore-not-found --cascade=foreground --wait deployment $(SERVICE)-exporter",
        "apply -k manifests/uninstall",
        "wait --for=condition=complete",
        "delete --ignore-not-found namespace",
        "delete --ignore-not-found -k manifests/base",
        "delete --ignore-not-found -k manifests/overlays/$(OVERLAY)",
    ]
    .iter()
    .map(|step| {
        undeploy
            .find(step)
            .unwrap_or_else(|| panic!("undeploy lacks {step}"))
    })
    .collect();
    assert!(
        order[0] < order[1] && order[1] < order[2] && order[3..].iter().all(|&i| i > order[2]),
        "undeploy stops the exporter, then releases the finalizers, then deletes the rest: {order:?}"
    );
}

#[test]
fn cert_manager_overlay_builds_and_agrees_with_itself() {
    let install = Install::decode(&render_cert_manager());
    check_common(&install, &Expect::default());

    check_cert_manager(&install);
    assert!(
        install.secrets.is_empty(),
        "cert-manager writes the Secrets"
    );
}

#[test]
fn self_signed_overlay_builds_from_certs_output_and_the_ca_bundle_verifies_the_secret() {
    let tmp = TempDir::new("ss");
    let (objects, certs_dir) = render_self_signed(&tmp);
    let install = Install::decode(&objects);
    check_common(&install, &Expect::default());
    assert!(install.cert_manager.is_empty());

    // The Secret the Deployment mounts holds what `certs` wrote, and never the CA key.
    assert_eq!(install.secrets.len(), 1);
    let secret = &install.secrets[0];
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("lightstep-tekton-webhook-tls")
    );
    assert_eq!(secret.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.as_ref().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["tls.crt", "tls.key"]);
    let cert_pem = &data["tls.crt"].0;
    assert_eq!(cert_pem, &fs::read(certs_dir.join("tls.crt")).unwrap());
    assert_eq!(
        &data["tls.key"].0,
        &fs::read(certs_dir.join("tls.key")).unwrap()
    );

    // Every webhook trusts the CA that signed it, for the name the API server dials
    // (<service>.<namespace>.svc) and the Service's other names.
    let ca_pem = fs::read(certs_dir.join("ca.crt")).unwrap();
    let clients = install.client_configs();
    assert_eq!(clients.len(), 4, "two mutating and two validating webhooks");
    for (webhook, client) in clients {
        let bundle = &client.ca_bundle.as_ref().expect("caBundle").0;
        assert_eq!(
            bundle, &ca_pem,
            "{webhook}: caBundle is the CA `certs` wrote"
        );
        for name in certs::service_dns_names(SERVICE, NAMESPACE) {
            verify(bundle, cert_pem, &name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
    }
}

#[test]
fn certs_command_writes_a_serving_certificate_for_the_service_signed_by_its_ca() {
    let tmp = TempDir::new("certs");
    let out = tmp.0.join("out");
    let output = Command::new(BIN)
        .args([
            "certs",
            "--service",
            "hook",
            "--namespace",
            "ops",
            "--days",
            "7",
            "--out",
        ])
        .arg(&out)
        .args(["--san", "10.1.2.3"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ca = fs::read(out.join("ca.crt")).unwrap();
    let cert = fs::read(out.join("tls.crt")).unwrap();
    for name in [
        "hook",
        "hook.ops",
        "hook.ops.svc",
        "hook.ops.svc.cluster.local",
        "10.1.2.3",
    ] {
        verify(&ca, &cert, name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    assert!(verify(&ca, &cert, "hook.other.svc").is_err());
    // Standard output is the caBundle, for scripts.
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(BASE64.decode(printed.trim()).unwrap(), ca);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "tls.key"] {
            let mode = fs::metadata(out.join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    let bad = Command::new(BIN)
        .args(["certs", "--service", "no such", "--out"])
        .arg(tmp.0.join("bad"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"no such\""));
}

#[test]
fn rotating_with_certs_keeps_the_previous_ca_trusted_for_one_round() {
    let tmp = TempDir::new("rotate");
    let (first_objects, certs_dir) = render_self_signed(&tmp);
    let first_cert = fs::read(certs_dir.join("tls.crt")).unwrap();
    let first_ca = fs::read(certs_dir.join("ca.crt")).unwrap();

    // Rotation: run certs again and re-apply. Until kubelet swaps the mounted Secret, the pods
    // still serve the first certificate: the new caBundle must trust it as well as the new one.
    run_certs(&certs_dir, &[]);
    let second_cert = fs::read(certs_dir.join("tls.crt")).unwrap();
    let second_ca = fs::read(certs_dir.join("ca.crt")).unwrap();
    assert_ne!(first_ca, second_ca);
    let overlay = certs_dir.parent().unwrap();
    let install = Install::decode(&kustomize(overlay));
    let server_name = format!("{SERVICE}.{NAMESPACE}.svc");
    for webhook in install.webhook_config().webhooks.as_ref().unwrap() {
        let bundle = &webhook.client_config.ca_bundle.as_ref().unwrap().0;
        verify(bundle, &first_cert, &server_name).expect("old certificate still trusted");
        verify(bundle, &second_cert, &server_name).expect("new certificate trusted");
    }
    drop(first_objects);

    // The next rotation drops the first CA; --drop-previous-ca drops the previous one at once.
    run_certs(&certs_dir, &["--drop-previous-ca"]);
    let install = Install::decode(&kustomize(overlay));
    let third_cert = fs::read(certs_dir.join("tls.crt")).unwrap();
    for webhook in install.webhook_config().webhooks.as_ref().unwrap() {
        let bundle = &webhook.client_config.ca_bundle.as_ref().unwrap().0;
        verify(bundle, &third_cert, &server_name).unwrap();
        assert!(verify(bundle, &second_cert, &server_name).is_err());
        assert!(verify(bundle, &first_cert, &server_name).is_err());
    }
}

#[test]
fn crd_file_is_what_the_crd_command_prints() {
    let output = Command::new(BIN).arg("crd").output().unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    let chart_crd = "charts/lightstep-tekton-webhook/crds/crd-tracingpolicy.yaml";
    let file =
        fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(chart_crd)).unwrap();
    assert!(
        printed == file,
        "{chart_crd} is not what `lightstep-tekton-webhook crd` prints; regenerate it (and its \
         rendering in manifests/base) with `make crd`"
    );
    // And what it prints is a CRD k8s-openapi reads, equal to the generated one.
    let crd: CustomResourceDefinition = serde_norway::from_str(&printed).unwrap();
    assert_eq!(crd, resource::crd());
}

#[test]
fn example_tracing_policy_decodes_and_is_valid() {
    let text = fs::read_to_string(manifests_dir().join("tracingpolicy.example.yaml")).unwrap();
    let value: Value = serde_norway::from_str(&text).unwrap();
    let policy = resource::decode(value).unwrap();
    let resolved = resource::resolve(&policy).unwrap();
    assert_eq!(resolved.mode, resource::PolicyMode::Audit);
    // Not part of any kustomization: applying the install never turns on a policy.
    for kustomization in ["base", "overlays/cert-manager", "overlays/self-signed"] {
        let k = fs::read_to_string(
            manifests_dir()
                .join(kustomization)
                .join("kustomization.yaml"),
        )
        .unwrap();
        assert!(!k.contains("tracingpolicy.example"), "{kustomization}");
    }
}

#[test]
fn example_token_secret_matches_the_default_policy_and_holds_no_token() {
    let text = fs::read_to_string(manifests_dir().join("base/token-secret.example.yaml")).unwrap();
    let object: Value = serde_norway::from_str(&text).unwrap();
    let secret: Secret = typed(&object);
    let token = Policy::embedded_default()
        .token
        .expect("default policy has a token");
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some(token.secret_name.as_str())
    );
    let value = &secret.string_data.as_ref().unwrap()[&token.secret_key];
    assert!(
        value.starts_with("REPLACE-WITH"),
        "a placeholder, not a token: {value}"
    );
    // Not part of the kustomization: the webhook never reads it, pods read it in their own
    // namespace, and re-applying the install must never overwrite a real token.
    let kustomization =
        fs::read_to_string(manifests_dir().join("base/kustomization.yaml")).unwrap();
    assert!(!kustomization.contains("token-secret"));
}

#[test]
fn the_binary_serves_the_webhook_configuration_as_installed() {
    let tmp = TempDir::new("serve");
    let (objects, _) = render_self_signed(&tmp);
    let install = Install::decode(&objects);
    let served = serve_like_the_deployment(&install, &tmp);
    let log = || fs::read_to_string(&served.log).unwrap_or_default();

    // The API server's view: trust only the caBundle, dial <service>.<namespace>.svc.
    let config = install.webhook_config();
    let webhooks = config.webhooks.as_ref().unwrap();
    let ca_bundle = &webhooks[0].client_config.ca_bundle.as_ref().unwrap().0;
    let client = client_config(&[std::str::from_utf8(ca_bundle).unwrap()], None);

    for webhook in webhooks {
        let service = webhook.client_config.service.as_ref().unwrap();
        let server_name = format!("{}.{}.svc", service.name, service.namespace);
        let tls = Some((&client, server_name.as_str()));
        // Wait for the listener (and, with it, the first probe kubelet would send).
        let (status, _) = eventually_blocking("serve comes up", &log, || {
            request(served.https, tls, "GET", "/readyz", b"").ok()
        });
        assert_eq!(status, 200, "/readyz\n{}", log());
        let (status, _) = request(served.https, tls, "GET", "/healthz", b"").unwrap();
        assert_eq!(status, 200, "/healthz");

        let review = fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tekton-pipeline-task-traced.json"),
        )
        .unwrap();
        let uid = serde_json::from_slice::<Value>(&review).unwrap()["request"]["uid"].clone();
        let path = service.path.as_deref().unwrap();
        let (status, body) = request(served.https, tls, "POST", path, &review).unwrap();
        assert_eq!(
            status,
            200,
            "{}: {}",
            webhook.name,
            String::from_utf8_lossy(&body)
        );
        let reply: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            reply["apiVersion"], "admission.k8s.io/v1",
            "{}",
            webhook.name
        );
        assert_eq!(reply["kind"], "AdmissionReview");
        assert_eq!(reply["response"]["uid"], uid);
        assert_eq!(
            reply["response"]["allowed"], true,
            "{}: {reply}",
            webhook.name
        );
        assert_eq!(
            reply["response"]["patchType"], "JSONPatch",
            "{}",
            webhook.name
        );
    }

    // The validating webhooks: the installed policy ConfigMap is allowed, the same ConfigMap
    // with an out-of-range ratio is refused with the field, on the path the configuration names.
    let validating = install.validating_config().webhooks.clone().unwrap();
    let service = validating[0].client_config.service.as_ref().unwrap();
    let server_name = format!("{}.{}.svc", service.name, service.namespace);
    let tls = Some((&client, server_name.as_str()));
    let path = service.path.as_deref().unwrap();
    let policy_map = install
        .config_maps
        .iter()
        .find(|m| {
            m.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(POLICY_LABEL))
        })
        .expect("the labelled policy ConfigMap");
    let mut bad_map = serde_json::to_value(policy_map).unwrap();
    bad_map["data"][POLICY_KEY] = Value::from("sampling:\n  ratio: 2\n");
    for (object, allowed) in [
        (serde_json::to_value(policy_map).unwrap(), true),
        (bad_map, false),
    ] {
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "validate-1",
                        "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
                        "resource": {"group": "", "version": "v1", "resource": "configmaps"},
                        "namespace": NAMESPACE, "operation": "UPDATE", "object": object}
        });
        let body = serde_json::to_vec(&review).unwrap();
        let (status, reply) = request(served.https, tls, "POST", path, &body).unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["response"]["uid"], "validate-1");
        assert_eq!(reply["response"]["allowed"], allowed, "{reply}");
        if !allowed {
            assert_eq!(
                reply["response"]["status"]["message"],
                "data[policy.yaml]: sampling.ratio: must be between 0 and 1, got 2"
            );
        }
    }

    // Prometheus scrapes the Service's metrics port, plain HTTP.
    let (status, body) = request(served.metrics, None, "GET", "/metrics", b"").unwrap();
    assert_eq!(status, 200);
    assert!(!body.is_empty());
}
