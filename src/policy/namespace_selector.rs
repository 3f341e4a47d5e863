//! A TracingPolicy's `namespaceSelector`, compiled: Kubernetes' label selector semantics, with
//! keys and values checked as the API server checks a built-in selector, so a selector that
//! would be refused there is refused here with the field it came from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::invalid::{Invalid, invalid};

/// A compiled `namespaceSelector`: Kubernetes' label selector semantics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceSelector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Kubernetes' limit on a label key's name part and on a label value (a DNS label's length).
const LABEL_PART_MAX: usize = 63;
/// Kubernetes' limit on a label key's prefix (a DNS subdomain's length).
const LABEL_PREFIX_MAX: usize = 253;

impl NamespaceSelector {
    /// Compiles a selector, refusing what the API server would refuse in a built-in selector:
    /// unknown operators, `In`/`NotIn` without values, `Exists`/`DoesNotExist` with values, and
    /// malformed keys or values. `None` and an empty selector match every namespace.
    pub fn compile(selector: Option<&LabelSelector>) -> Result<NamespaceSelector, Invalid> {
        let mut requirements = Vec::new();
        let Some(selector) = selector else {
            return Ok(NamespaceSelector { requirements });
        };
        for (key, value) in selector.match_labels.iter().flatten() {
            check_key(key).map_err(|r| invalid(format!("matchLabels.{key}"), r))?;
            check_value(value).map_err(|r| invalid(format!("matchLabels.{key}"), r))?;
            requirements.push(Requirement::In(
                key.clone(),
                BTreeSet::from([value.clone()]),
            ));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let at = |part: &str| format!("matchExpressions[{i}].{part}");
            check_key(&expr.key).map_err(|r| invalid(at("key"), r))?;
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            for v in &values {
                check_value(v).map_err(|r| invalid(at("values"), r))?;
            }
            let key = expr.key.clone();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(invalid(
                        at("values"),
                        format!("must not be empty with operator {}", expr.operator),
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(invalid(
                        at("values"),
                        format!("must be empty with operator {}", expr.operator),
                    ));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(invalid(
                        at("operator"),
                        format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(NamespaceSelector { requirements })
    }

    /// Whether a namespace with these labels is selected: every requirement holds (`NotIn` and
    /// `DoesNotExist` hold for a missing key, as in Kubernetes).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for NamespaceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("every namespace");
        }
        let join = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::In(k, vs) if vs.len() == 1 => format!("{k}={}", join(vs)),
                Requirement::In(k, vs) => format!("{k} in ({})", join(vs)),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", join(vs)),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of 1 to 63 characters
/// (alphanumerics, `-`, `_`, `.`, alphanumeric at both ends).
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= LABEL_PREFIX_MAX
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("{key:?}: the prefix must be a DNS subdomain"));
        }
    }
    if name.is_empty() || !is_label_part(name) {
        return Err(format!("{key:?} is not a valid label key"));
    }
    Ok(())
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_part(value) {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid label value"))
    }
}

fn is_label_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.len() <= LABEL_PART_MAX
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}
