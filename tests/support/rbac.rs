//! The install's RBAC as the stand-in API servers check requests against it: the rules of a
//! rendered manifest, and whether they grant one request.
#![allow(dead_code)]

use std::path::PathBuf;

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Deserialize as _;
use serde_json::Value;

/// The rules of the `kind` (ClusterRole or Role) in `manifests/base/<file>`.
pub fn install_rules(file: &str, kind: &str) -> Vec<PolicyRule> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/base")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .find(|v| v["kind"] == kind)
        .map(|v| serde_json::from_value(v["rules"].clone()).unwrap())
        .unwrap_or_else(|| panic!("a {kind} in {}", path.display()))
}

/// Whether `rules` grant (API group, resource, verb); where a rule names the objects it covers,
/// only on `lease` (and never `create`, which the API server cannot limit by name).
pub fn granted(rules: &[PolicyRule], group: &str, resource: &str, verb: &str, lease: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
            && r.resource_names
                .as_ref()
                .is_none_or(|names| verb != "create" && names.iter().any(|n| n == lease))
    })
}
