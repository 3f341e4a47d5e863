//! The Helm chart, rendered by both Helm majors users run (3.17 and 4.1, installed by
//! `.ci/install-helm`): `helm lint --strict`; every value set in the chart's `ci/` through the
//! same install checks the kustomize overlays get (tests/support/install.rs); the values schema
//! refusing what it must; `certs.mode=chart` keeping its CA across upgrades; the `helm test`
//! hook's script run against the real binary; and manifests/base being the chart's current
//! rendering.
//!
//! Helm comes from `$HELM3` and `$HELM4` (default /usr/local/lib/helm{3,4}/helm). Without either,
//! the suite says so and passes, unless `CI` is set: CI installs both, so a missing Helm there is
//! a failure.

mod support {
    pub mod http;
    pub mod install;
    pub mod poll;
    pub mod release_hook;
    pub mod tmp;
}

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use lightstep_tekton_webhook::certs;
use lightstep_tekton_webhook::policy::resource;
use serde_json::Value;
use support::http::request;
use support::install::*;
use support::poll::eventually_blocking;
use support::release_hook::check_release_hook;
use support::tmp::TempDir;

fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/lightstep-tekton-webhook")
}

/// The Helm binaries to test with, by major. Empty (with a message) only outside CI.
fn helms() -> Vec<(&'static str, PathBuf)> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (major, var) in [("helm3", "HELM3"), ("helm4", "HELM4")] {
        let path = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/usr/local/lib/{major}/helm")));
        if path.is_file() {
            found.push((major, path));
        } else {
            missing.push(format!("{major} ({} or ${var})", path.display()));
        }
    }
    if !missing.is_empty() {
        let message = format!(
            "Helm missing: {}; install with .ci/install-helm",
            missing.join(", ")
        );
        assert!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("SKIPPED, {message}");
        if found.len() < 2 {
            return Vec::new();
        }
    }
    found
}

fn run_helm(helm: &Path, args: &[&str]) -> Output {
    Command::new(helm)
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("ltw-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("ltw-helm-config"),
        )
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", helm.display()))
}

/// `helm template` of `chart` as release lightstep-tekton-webhook in lightstep-tekton (the names
/// manifests/base uses), with the CRDs, parsed into objects.
fn template(helm: &Path, chart: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["template", SERVICE, chart.to_str().unwrap()];
    all.extend(["--namespace", NAMESPACE, "--include-crds"]);
    all.extend(args);
    let output = run_helm(helm, &all);
    assert!(
        output.status.success(),
        "{} {}: {}",
        helm.display(),
        all.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_objects(&String::from_utf8(output.stdout).unwrap())
}

/// A value set from the chart's ci/ directory.
fn values(name: &str) -> String {
    chart_dir()
        .join("ci")
        .join(format!("{name}-values.yaml"))
        .to_str()
        .unwrap()
        .to_string()
}

/// A CA and serving certificate from the `certs` command, as a user of certs.mode=secret has.
fn certs_command(tmp: &TempDir) -> PathBuf {
    let out = tmp.0.join("certs");
    let output = Command::new(BIN)
        .args(["certs", "--service", SERVICE, "--namespace", NAMESPACE])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success());
    out
}

fn secret_data<'a>(
    install: &'a Install,
    name: &str,
) -> &'a std::collections::BTreeMap<String, k8s_openapi::ByteString> {
    install
        .secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no Secret {name}"))
        .data
        .as_ref()
        .unwrap()
}

/// Every webhook's caBundle (all equal), as PEM.
fn ca_bundle(install: &Install) -> Vec<u8> {
    let webhooks = install.webhook_config().webhooks.as_ref().unwrap();
    let bundle = webhooks[0]
        .client_config
        .ca_bundle
        .as_ref()
        .expect("caBundle")
        .0
        .clone();
    for webhook in webhooks {
        assert_eq!(webhook.client_config.ca_bundle.as_ref().unwrap().0, bundle);
    }
    bundle
}

/// certs.mode=chart: the Secret the Deployment mounts holds a certificate for every name of the
/// Service, signed by the CA every webhook's caBundle holds, and the CA's key is elsewhere.
fn check_chart_certs(install: &Install) {
    let tls = secret_data(install, "lightstep-tekton-webhook-tls");
    let bundle = ca_bundle(install);
    for name in certs::service_dns_names(SERVICE, NAMESPACE) {
        verify(&bundle, &tls["tls.crt"].0, &name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    assert_eq!(
        tls["ca.crt"].0, bundle,
        "ca.crt (for the helm test pod) is the CA"
    );
    let ca = secret_data(install, "lightstep-tekton-webhook-ca");
    assert_eq!(ca["tls.crt"].0, bundle);
    assert!(!tls.contains_key("ca.key") && !tls.contains_key("tls.key.ca"));
    assert!(install.cert_manager.is_empty());
}

#[test]
fn lint_strict_passes_with_both_majors_and_every_value_set() {
    for (major, helm) in helms() {
        let mut sets: Vec<PathBuf> = fs::read_dir(chart_dir().join("ci"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        sets.sort();
        assert!(sets.len() >= 7, "{sets:?}");
        for set in sets {
            let output = run_helm(
                &helm,
                &[
                    "lint",
                    "--strict",
                    chart_dir().to_str().unwrap(),
                    "-f",
                    set.to_str().unwrap(),
                ],
            );
            assert!(
                output.status.success(),
                "{major} lint --strict -f {}: {}{}",
                set.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn every_value_set_passes_the_install_checks() {
    let tmp = TempDir::new("chart-sets");
    let certs_dir = certs_command(&tmp);
    let given_bundle = BASE64.encode(fs::read(certs_dir.join("ca.crt")).unwrap());
    let helm_default = Expect {
        namespace_object: false,
        ..Expect::default()
    };
    for (major, helm) in helms() {
        let render = |args: &[&str]| Install::decode(&template(&helm, &chart_dir(), args));

        // Defaults: certs.mode=chart.
        let install = render(&["--skip-tests", "-f", &values("defaults")]);
        check_common(&install, &helm_default);
        check_chart_certs(&install);
        assert!(
            install.monitoring.is_empty(),
            "{major}: monitoring is opt-in"
        );
        // The finalizers are released after an uninstall, once the exporter is stopping.
        check_release_hook(&install, "post-delete");
        let off = render(&[
            "--skip-tests",
            "--set",
            "exporter.releaseFinalizers.enabled=false",
        ]);
        assert!(off.release_hook.is_empty(), "{major}: the hook turns off");

        let install = render(&["--skip-tests", "-f", &values("cert-manager")]);
        check_common(&install, &helm_default);
        check_cert_manager(&install);

        // An existing Secret and the caBundle that verifies it.
        let set_bundle = format!("certs.secret.caBundle={given_bundle}");
        let install = render(&[
            "--skip-tests",
            "-f",
            &values("secret"),
            "--set",
            &set_bundle,
        ]);
        let expect = Expect {
            tls_secret: "my-webhook-tls".to_string(),
            ..helm_default.clone()
        };
        check_common(&install, &expect);
        assert!(
            install.secrets.is_empty(),
            "{major}: the chart makes no certificate"
        );
        assert_eq!(
            ca_bundle(&install),
            fs::read(certs_dir.join("ca.crt")).unwrap()
        );

        let install = render(&["--skip-tests", "-f", &values("monitoring")]);
        check_common(&install, &helm_default);
        check_monitoring(&install);

        let install = render(&["--skip-tests", "-f", &values("enforce-only")]);
        let expect = Expect {
            webhooks: vec![WEBHOOKS[1]],
            ..helm_default.clone()
        };
        check_common(&install, &expect);

        let install = render(&["--skip-tests", "-f", &values("inject-only")]);
        let expect = Expect {
            webhooks: vec![WEBHOOKS[0]],
            validating: false,
            ..helm_default.clone()
        };
        check_common(&install, &expect);

        let install = render(&["--skip-tests", "-f", &values("exporter-off")]);
        let expect = Expect {
            exporter: None,
            ..helm_default.clone()
        };
        check_common(&install, &expect);
        // The upgrade that turns the exporter off releases what it held.
        check_release_hook(&install, "post-install,post-upgrade,post-delete");

        let install = render(&["--skip-tests", "-f", &values("everything")]);
        let expect = Expect {
            replicas: 3,
            excluded_namespaces: vec!["tekton-pipelines".to_string()],
            token_namespaces: vec!["ci".to_string(), "builds".to_string()],
            exporter: Some(3),
            ..helm_default.clone()
        };
        check_common(&install, &expect);
        check_everything(&install);

        // A release with another name: every object named after it, still consistent.
        let objects = template(
            &helm,
            &chart_dir(),
            &["--skip-tests", "--set", "fullnameOverride=tracing"],
        );
        let names: Vec<&str> = objects
            .iter()
            .filter(|o| o["kind"] != "CustomResourceDefinition")
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("tracing")),
            "{major}: {names:?}"
        );
    }
}

/// The values everything-values.yaml sets, each where it belongs.
fn check_everything(install: &Install) {
    let deployment = install.deployment();
    let template = &deployment.spec.as_ref().unwrap().template;
    let pod = install.pod_spec();
    let container = install.container();
    assert!(
        container.image.as_ref().unwrap().contains("@sha256:0123"),
        "digest pins the image"
    );
    assert_eq!(
        pod.image_pull_secrets.as_ref().unwrap()[0].name,
        "registry-credentials"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-cluster-critical")
    );
    assert!(pod.node_selector.is_some() && pod.tolerations.is_some() && pod.affinity.is_some());
    let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(labels["example.com/tier"], "infra");
    let selector = deployment
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .as_ref()
        .unwrap();
    assert!(
        !selector.contains_key("example.com/tier"),
        "pod labels stay out of the selector"
    );
    let annotations = template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(annotations["example.com/team"], "platform");
    let env: Vec<(String, String)> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert!(
        env.contains(&("RUST_LOG".into(), "debug".into())),
        "{env:?}"
    );
    assert!(env.contains(&(
        "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        "http://otel-collector.observability:4318".into()
    )));
    assert!(
        container
            .args
            .as_ref()
            .unwrap()
            .contains(&"--log-format=text".to_string())
    );
    let webhooks = install.webhook_config().webhooks.as_ref().unwrap();
    assert_eq!(webhooks[0].timeout_seconds, Some(2));
    // The token Secrets hold the value given, nothing else does.
    for secret in install
        .secrets
        .iter()
        .filter(|s| s.type_.as_deref() == Some("Opaque"))
    {
        assert_eq!(
            secret.data.as_ref().unwrap()["access-token"].0,
            b"not-a-real-token"
        );
    }
}

/// The ServiceMonitor scrapes the Service's metrics port; the alerts cover what the issue names.
fn check_monitoring(install: &Install) {
    let monitor = install
        .monitoring
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    let service = install.service();
    let selector: std::collections::BTreeMap<String, String> =
        serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone()).unwrap();
    let service_labels = service.metadata.labels.as_ref().unwrap();
    assert!(
        selector
            .iter()
            .all(|(k, v)| service_labels.get(k) == Some(v))
    );
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(
        install
            .service_ports()
            .iter()
            .any(|p| p.name.as_deref() == Some(port)),
        "the ServiceMonitor's port {port} is the Service's"
    );
    let rule = install
        .monitoring
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    // The exporter's pods are scraped by a PodMonitor on their admin port.
    let exporter = install.exporter.as_deref().expect("decoded");
    let pods = exporter
        .monitoring
        .iter()
        .find(|o| o["kind"] == "PodMonitor")
        .expect("a PodMonitor for the exporter");
    let exporter = exporter.deployment();
    let template = &exporter.spec.as_ref().unwrap().template;
    let pod_labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let selector: std::collections::BTreeMap<String, String> =
        serde_json::from_value(pods["spec"]["selector"]["matchLabels"].clone()).unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    let port = pods["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let ports = template.spec.as_ref().unwrap().containers[0]
        .ports
        .clone()
        .unwrap_or_default();
    assert!(
        ports.iter().any(|p| p.name.as_deref() == Some(port)),
        "{port}"
    );
    for wanted in [
        "Errors",
        "EnforceDenials",
        "CertificateExpiry",
        "ExporterLag",
        "ExporterRunsLost",
    ] {
        assert!(
            alerts.iter().any(|a| a.ends_with(wanted)),
            "{wanted}: {alerts:?}"
        );
    }
    for r in rule["spec"]["groups"][0]["rules"].as_array().unwrap() {
        assert_eq!(
            r["labels"]["team"], "platform",
            "alertLabels on every alert"
        );
        let expr = r["expr"].as_str().unwrap();
        assert!(expr.contains(&format!("job=\"{SERVICE}\"")), "{expr}");
    }
}

/// The metric names the PrometheusRule's expressions use.
fn rule_metrics(install: &Install) -> Vec<String> {
    let rule = install
        .monitoring
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    let text = rule["spec"].to_string();
    let mut names: Vec<String> = text
        .match_indices("lightstep_tekton_webhook_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 4, "{names:?}");
    names
}

#[test]
fn the_schema_refuses_unknown_keys_wrong_types_and_contradictions() {
    for (major, helm) in helms() {
        let chart = chart_dir();
        let refuse = |set: &[&str], says: &str| {
            let mut args = vec!["template", "x", chart.to_str().unwrap()];
            args.extend(set);
            let output = run_helm(&helm, &args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{major}: {set:?} was accepted");
            assert!(stderr.contains(says), "{major}: {set:?}: {stderr}");
        };
        refuse(&["--set", "webhook.replica=3"], "replica");
        refuse(&["--set", "imag.tag=1"], "imag");
        refuse(&["--set", "webhook.replicas=two"], "replicas");
        refuse(
            &["--set", "webhooks.enforce.failurePolicy=Sometimes"],
            "failurePolicy",
        );
        refuse(
            &["--set", "webhooks.inject.timeoutSeconds=31"],
            "timeoutSeconds",
        );
        refuse(&["--set", "certs.mode=self-signed"], "mode");
        refuse(&["--set", "policy.sampling.ratoi=1"], "ratoi");
        refuse(&["--set", "policy.sampling.ratio=2"], "ratio");
        refuse(
            &["--set", "monitoring.serviceMonitor.enabled=yes"],
            "enabled",
        );
        refuse(&["--set", "image.digest=latest"], "digest");
        // Each value valid alone, wrong together: the templates' own checks.
        refuse(
            &[
                "--set",
                "webhooks.inject.enabled=false",
                "--set",
                "webhooks.enforce.enabled=false",
            ],
            "enable at least one",
        );
        refuse(
            &[
                "--set",
                "token.create=true",
                "--set",
                "token.namespaces={ci}",
            ],
            "token.value",
        );
        refuse(
            &["--set", "token.create=true", "--set", "token.value=t"],
            "token.namespaces",
        );
    }
}

/// The chart's `policy` schema has the policy file's fields, no more and no fewer, with the
/// same enums: the TracingPolicy CRD's spec (generated from the same Rust types) less what only
/// a TracingPolicy has, plus the file's `name`.
#[test]
fn the_policy_schema_follows_the_policy_types() {
    let schema: Value =
        serde_json::from_str(&fs::read_to_string(chart_dir().join("values.schema.json")).unwrap())
            .unwrap();
    let chart_policy = &schema["properties"]["policy"];
    let crd = serde_json::to_value(resource::crd()).unwrap();
    let mut spec =
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone();
    let properties = spec["properties"].as_object_mut().unwrap();
    for only_a_resource in ["mode", "namespaceSelector", "priority"] {
        assert!(
            properties.remove(only_a_resource).is_some(),
            "{only_a_resource}"
        );
    }
    properties.insert("name".into(), serde_json::json!({"type": "string"}));
    fn compare(chart: &Value, code: &Value, at: &str) {
        let keys = |v: &Value| -> Vec<String> {
            v["properties"]
                .as_object()
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(
            keys(chart),
            keys(code),
            "values.schema.json {at}: the policy's fields"
        );
        if code.get("enum").is_some() {
            assert_eq!(chart["enum"], code["enum"], "values.schema.json {at}: enum");
        }
        if !keys(code).is_empty() {
            assert_eq!(chart["additionalProperties"], false, "{at}: closed");
        }
        for key in keys(code) {
            compare(
                &chart["properties"][&key],
                &code["properties"][&key],
                &format!("{at}.{key}"),
            );
        }
    }
    compare(chart_policy, &spec, "policy");
}

/// `chart` mode across upgrades. `lookup` needs a cluster, and `helm template` has none (it gets
/// nothing, as on a first install), so this runs a copy of the chart whose one `lookup`
/// (templates/_lookup.tpl) reads the "existing" Secrets from files instead: what the cluster
/// would hold after the previous render was applied.
#[test]
fn chart_mode_keeps_its_ca_across_upgrades_and_renews_near_expiry() {
    let Some((_, helm)) = helms().into_iter().next() else {
        return;
    };
    let tmp = TempDir::new("chart-upgrade");
    let chart = tmp.0.join("chart");
    copy_tree(&chart_dir(), &chart);
    fs::write(
        chart.join("templates/_lookup.tpl"),
        r#"{{- define "ltw.existingSecret" -}}
{{- .root.Files.Get (printf "existing/%s.json" .name) | default "{}" -}}
{{- end -}}"#,
    )
    .unwrap();
    fs::create_dir_all(chart.join("existing")).unwrap();
    let secret_objects = |objects: &[Value]| -> Vec<Value> {
        objects
            .iter()
            .filter(|o| o["kind"] == "Secret")
            .cloned()
            .collect()
    };
    let apply = |objects: &[Value]| {
        for secret in secret_objects(objects) {
            let name = secret["metadata"]["name"].as_str().unwrap();
            fs::write(
                chart.join(format!("existing/{name}.json")),
                secret.to_string(),
            )
            .unwrap();
        }
    };
    let render = || template(&helm, &chart, &["--skip-tests"]);
    let server_name = format!("{SERVICE}.{NAMESPACE}.svc");

    // Install, then an upgrade: the same CA, certificate and key, byte for byte.
    let first = render();
    apply(&first);
    let second = render();
    assert_eq!(
        secret_objects(&first),
        secret_objects(&second),
        "an upgrade regenerated the certificates"
    );
    let first_install = Install::decode(&first);
    check_chart_certs(&first_install);
    assert_eq!(
        ca_bundle(&first_install),
        ca_bundle(&Install::decode(&second))
    );

    // The serving certificate close to its expiry: the upgrade issues a new one from the same CA.
    let tls_file = chart.join(format!("existing/{SERVICE}-tls.json"));
    let mut tls: Value = serde_json::from_str(&fs::read_to_string(&tls_file).unwrap()).unwrap();
    let soon = "2000-01-01T00:00:00Z";
    tls["metadata"]["annotations"]["lightstep-tekton.io/not-after"] = soon.into();
    fs::write(&tls_file, tls.to_string()).unwrap();
    let renewed = Install::decode(&render());
    check_chart_certs(&renewed);
    let old_cert = &secret_data(&first_install, &format!("{SERVICE}-tls"))["tls.crt"].0;
    let new_cert = &secret_data(&renewed, &format!("{SERVICE}-tls"))["tls.crt"].0;
    assert_ne!(old_cert, new_cert, "renewed");
    assert_eq!(ca_bundle(&renewed), ca_bundle(&first_install), "same CA");

    // The CA close to its expiry: a new CA and certificate, and the bundle trusts the old CA too,
    // so pods still serving the old certificate are not refused until kubelet updates them.
    apply(&first);
    let ca_file = chart.join(format!("existing/{SERVICE}-ca.json"));
    let mut ca: Value = serde_json::from_str(&fs::read_to_string(&ca_file).unwrap()).unwrap();
    ca["metadata"]["annotations"]["lightstep-tekton.io/not-after"] = soon.into();
    fs::write(&ca_file, ca.to_string()).unwrap();
    let rotated = Install::decode(&render());
    let bundle = ca_bundle(&rotated);
    let rotated_cert = &secret_data(&rotated, &format!("{SERVICE}-tls"))["tls.crt"].0;
    verify(&bundle, rotated_cert, &server_name).expect("the new certificate is trusted");
    verify(&bundle, old_cert, &server_name).expect("the old certificate is still trusted");
    assert_ne!(
        secret_data(&rotated, &format!("{SERVICE}-ca"))["tls.crt"].0,
        ca_bundle(&first_install)
    );

    // And what real Helm does without a cluster: nothing to look up, so new certificates each
    // time; the reason values.yaml sends `helm template` users to cert-manager or secret mode.
    let plain = |_: ()| secret_objects(&template(&helm, &chart_dir(), &["--skip-tests"]));
    assert_ne!(plain(()), plain(()));
}

/// The `helm test` pod's own script, run here against the binary started as the Deployment
/// starts it, with curl reaching the Service's name on loopback.
#[test]
fn the_helm_test_hook_passes_against_the_binary_and_fails_on_a_wrong_reply() {
    let Some((_, helm)) = helms().into_iter().next() else {
        return;
    };
    let tmp = TempDir::new("chart-hook");
    let objects = template(&helm, &chart_dir(), &["-f", &values("monitoring")]);
    let hooks: Vec<&Value> = objects
        .iter()
        .filter(|o| o["metadata"]["annotations"]["helm.sh/hook"] == "test")
        .collect();
    assert_eq!(hooks.len(), 2, "a ConfigMap and a Pod");
    let install = Install::decode(
        &objects
            .iter()
            .filter(|o| o["metadata"]["annotations"]["helm.sh/hook"].is_null())
            .cloned()
            .collect::<Vec<_>>(),
    );
    let pod = hooks.iter().find(|o| o["kind"] == "Pod").unwrap();
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value((*pod).clone()).unwrap();
    let pod_labels = pod.metadata.labels.as_ref().unwrap();
    let service_selector = install
        .service()
        .spec
        .as_ref()
        .unwrap()
        .selector
        .clone()
        .unwrap();
    assert!(
        !service_selector
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the Service must not send reviews to the test pod"
    );
    let map = hooks.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    let review_dir = tmp.0.join("review");
    fs::create_dir_all(&review_dir).unwrap();
    for (key, value) in map["data"].as_object().unwrap() {
        fs::write(review_dir.join(key), value.as_str().unwrap()).unwrap();
    }
    // The projected ca.crt from the serving certificate's Secret.
    let tls = secret_data(&install, &format!("{SERVICE}-tls"));
    fs::write(review_dir.join("ca.crt"), &tls["ca.crt"].0).unwrap();

    let served = serve_like_the_deployment(&install, &tmp);
    let container = &pod.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        container.command.as_deref(),
        Some(&["sh".to_string(), "/review/test.sh".to_string()][..])
    );
    let env: Vec<(String, String)> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap()))
        .collect();
    let url = env
        .iter()
        .find(|(k, _)| k == "WEBHOOK_URL")
        .unwrap()
        .1
        .clone();
    let host = url
        .trim_start_matches("https://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(host, format!("{SERVICE}.{NAMESPACE}.svc"));
    // curl, with the Service's name and port leading to the local listener: a wrapper first in
    // PATH that runs the real curl by its full path.
    let real_curl = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("curl"))
        .find(|p| p.is_file())
        .expect("curl (the hook's image has it; install it here to run the hook's script)");
    let bin = tmp.0.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let curl = bin.join("curl");
    fs::write(
        &curl,
        format!(
            "#!/bin/sh\nexec {} --connect-to {host}:443:127.0.0.1:{} \"$@\"\n",
            real_curl.display(),
            served.https.port()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&curl, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = || fs::read_to_string(&served.log).unwrap_or_default();
    let run_hook = || {
        eventually_blocking("the hook reaches the listener", &log, || {
            let output = Command::new("sh")
                .arg(review_dir.join("test.sh"))
                .env("PATH", &path)
                .env("WEBHOOK_URL", &url)
                .env("REVIEW_DIR", &review_dir)
                .output()
                .expect("sh");
            // Until the listener is up, curl cannot connect (exit 7); then the real answer.
            (output.status.code() != Some(7)).then_some(output)
        })
    };
    let output = run_hook();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        fs::read_to_string(&served.log).unwrap_or_default()
    );
    assert!(
        stdout.contains("/mutate: allowed") && stdout.contains("/enforce: allowed"),
        "{stdout}"
    );

    // The PrometheusRule's metrics are ones the binary exports: in its /metrics now (families
    // with labels appear once they have a sample, as admissions do after the hook's reviews), or
    // else in the metrics reference, docs/metrics.md.
    let (status, body) = request(served.metrics, None, "GET", "/metrics", b"").unwrap();
    assert_eq!(status, 200);
    let exported = String::from_utf8(body).unwrap();
    assert!(
        exported.contains("# TYPE lightstep_tekton_webhook_admissions counter"),
        "{exported}"
    );
    let reference =
        fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"))
            .unwrap();
    for name in rule_metrics(&install) {
        let family = name.strip_suffix("_total").unwrap_or(&name);
        let documented = format!(
            "| `{}` |",
            name.trim_start_matches("lightstep_tekton_webhook_")
        );
        assert!(
            exported.contains(&format!("# TYPE {family} ")) || reference.contains(&documented),
            "{name}, in the PrometheusRule, is neither exported nor documented"
        );
    }

    // A reply to another review is caught: the script checks the uid, not just "allowed".
    let review = fs::read_to_string(review_dir.join("review.json")).unwrap();
    fs::write(
        review_dir.join("review.json"),
        review.replace("\"uid\":\"helm-test-", "\"uid\":\"other-"),
    )
    .unwrap();
    let output = run_hook();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not answer this review"));
}

/// manifests/base (and the cert-manager overlay's certificates.yaml) is what `make
/// manifests-base` renders from the chart now: the target itself runs into a temporary
/// directory and every file is compared.
#[test]
fn manifests_base_is_the_current_rendering_of_the_chart() {
    let Some((_, helm)) = helms().into_iter().next() else {
        return;
    };
    let tmp = TempDir::new("chart-base");
    let base = tmp.0.join("base");
    let cert_manager = tmp.0.join("cert-manager");
    let uninstall = tmp.0.join("uninstall");
    fs::create_dir_all(&uninstall).unwrap();
    fs::create_dir_all(&base).unwrap();
    fs::create_dir_all(&cert_manager).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(std::env::var("MAKE").unwrap_or_else(|_| "make".into()))
        .current_dir(&root)
        .arg("-s")
        .arg("manifests-base")
        .arg(format!("HELM={}", helm.display()))
        .arg(format!("BASE_DIR={}", base.display()))
        .arg(format!("CERT_MANAGER_DIR={}", cert_manager.display()))
        .arg(format!("UNINSTALL_DIR={}", uninstall.display()))
        .arg(format!("RENDER_DIR={}", tmp.0.join("render").display()))
        .output()
        .expect("make");
    assert!(
        output.status.success(),
        "make manifests-base: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let regenerate =
        "regenerate with `make manifests-base` (after `make crd` if the policy types changed)";
    let mut rendered: Vec<String> = fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    rendered.sort();
    assert!(
        rendered.contains(&"deployment.yaml".to_string()),
        "{rendered:?}"
    );
    for name in &rendered {
        let fresh = fs::read_to_string(base.join(name)).unwrap();
        let checked_in =
            fs::read_to_string(root.join("manifests/base").join(name)).unwrap_or_default();
        assert!(
            fresh == checked_in,
            "manifests/base/{name} is not the chart's rendering; {regenerate}"
        );
    }
    let fresh = fs::read_to_string(cert_manager.join("certificates.yaml")).unwrap();
    let checked_in =
        fs::read_to_string(root.join("manifests/overlays/cert-manager/certificates.yaml")).unwrap();
    assert!(
        fresh == checked_in,
        "manifests/overlays/cert-manager/certificates.yaml is not the chart's rendering; {regenerate}"
    );
    let fresh = fs::read_to_string(uninstall.join("release-finalizers.yaml")).unwrap();
    let checked_in =
        fs::read_to_string(root.join("manifests/uninstall/release-finalizers.yaml")).unwrap();
    assert!(
        fresh == checked_in,
        "manifests/uninstall/release-finalizers.yaml is not the chart's rendering; {regenerate}"
    );

    // Nothing in manifests/base but the rendering and the files kept by hand, and the
    // kustomization lists every rendered file.
    let by_hand = [
        "kustomization.yaml",
        "namespace.yaml",
        "token-secret.example.yaml",
    ];
    for entry in fs::read_dir(root.join("manifests/base")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            rendered.contains(&name) || by_hand.contains(&name.as_str()),
            "manifests/base/{name} is neither rendered from the chart nor kept by hand; remove it or {regenerate}"
        );
    }
    let kustomization = fs::read_to_string(root.join("manifests/base/kustomization.yaml")).unwrap();
    for name in &rendered {
        assert!(
            kustomization.contains(&format!("- {name}")),
            "manifests/base/kustomization.yaml lacks {name}"
        );
    }
}

#[test]
fn package_holds_the_chart_without_the_test_value_sets() {
    let Some((_, helm)) = helms().into_iter().next() else {
        return;
    };
    let tmp = TempDir::new("chart-package");
    let output = run_helm(
        &helm,
        &[
            "package",
            chart_dir().to_str().unwrap(),
            "--destination",
            tmp.0.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let package = tmp.0.join("lightstep-tekton-webhook-0.1.0.tgz");
    let listing = Command::new("tar")
        .arg("tzf")
        .arg(&package)
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    for wanted in [
        "crds/crd-tracingpolicy.yaml",
        "values.schema.json",
        "templates/NOTES.txt",
        "README.md",
    ] {
        assert!(
            listing.contains(wanted),
            "{wanted} missing from the package:\n{listing}"
        );
    }
    assert!(
        !listing.contains("/ci/"),
        "ci/ is for tests only:\n{listing}"
    );
}
