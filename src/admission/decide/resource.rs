//! The telemetry resource of a TaskRun attempt: `service.name` and the `OTEL_RESOURCE_ATTRIBUTES`
//! list, shared with the run-span exporter so that the steps' telemetry and the run spans land in
//! one service with one set of attributes.

use std::fmt::Write as _;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::admission::pod::PodView as Pod;
use crate::contract;
use crate::contract::tekton::TaskRunFacts;
use crate::policy::{Policy, TemplatePart};

/// Characters left readable in `OTEL_RESOURCE_ATTRIBUTES` values; everything else (including
/// `,`, `=`, `%`, `+`, `$` and spaces) is percent-encoded as the OpenTelemetry spec requires.
const ATTRIBUTE_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/')
    .remove(b':');

/// The longest attribute value, in bytes as written into `OTEL_RESOURCE_ATTRIBUTES` (encoded),
/// and the longest value read off the run into `service.name`. The OpenTelemetry specification
/// sets no default attribute value length limit (`OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT` defaults to
/// none), but SDKs refuse longer ones in this variable: opentelemetry-js's `EnvDetector` and the
/// Java SDK's `Resource` check "a ASCII string with a length not exceed 255 characters" and the
/// JS detector then drops the whole variable. 255 keeps every attribute usable everywhere, and
/// bounds what a pod's annotations can make the webhook copy into each step.
pub(super) const ATTRIBUTE_VALUE_MAX: usize = 255;

/// `service.name` of a TaskRun attempt: the policy's template filled from the facts, else the
/// TaskRun's name. `escape` is applied to every value read off the run (the webhook escapes `$`
/// for the env list; the run-span exporter passes values through), so the steps' telemetry and
/// the run spans land in one service. Each value read off the run is first clipped to
/// `ATTRIBUTE_VALUE_MAX` bytes.
pub fn service_name(
    policy: &Policy,
    facts: &TaskRunFacts<'_>,
    namespace: &str,
    escape: fn(&str) -> String,
) -> String {
    let mut out = String::new();
    for part in policy.service_name.parts() {
        match part {
            TemplatePart::Literal(text) => out.push_str(text),
            TemplatePart::Field(alternatives) => {
                if let Some(value) = alternatives
                    .iter()
                    .find_map(|f| facts.template_field(f, namespace))
                {
                    out.push_str(&escape(clip(value, ATTRIBUTE_VALUE_MAX)));
                }
            }
        }
    }
    if out.trim().is_empty() {
        escape(clip(facts.task_run, ATTRIBUTE_VALUE_MAX))
    } else {
        out
    }
}

/// The run's attributes ([`contract::attributes`]) then the policy's own, values encoded and
/// clipped to `ATTRIBUTE_VALUE_MAX` bytes.
pub fn resource_attributes(
    pod: &Pod,
    facts: &TaskRunFacts<'_>,
    namespace: &str,
    policy: &Policy,
) -> Vec<(String, String)> {
    let pod_name = pod.metadata.name.as_deref();
    let mut out: Vec<(String, String)> =
        contract::attributes::task_run_attributes(facts, namespace, pod_name)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), encode_attribute(&v)))
            .collect();
    policy.add_resource_attributes(&mut out, encode_attribute);
    out
}

/// Percent-encodes the longest prefix of a value (whole characters) whose encoding fits in
/// `ATTRIBUTE_VALUE_MAX` bytes. The loop stops at the bound, so a huge value costs no more than
/// a short one.
fn encode_attribute(value: &str) -> String {
    let mut budget = ATTRIBUTE_VALUE_MAX;
    let mut end = 0;
    for (at, c) in value.char_indices() {
        let mut buf = [0; 4];
        let encoded = utf8_percent_encode(c.encode_utf8(&mut buf), ATTRIBUTE_VALUE);
        let width: usize = encoded.map(str::len).sum();
        if width > budget {
            break;
        }
        budget -= width;
        end = at + c.len_utf8();
    }
    utf8_percent_encode(&value[..end], ATTRIBUTE_VALUE).to_string()
}

/// The longest prefix of `value` of at most `max` bytes that ends on a character boundary.
fn clip(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut cut = max;
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    &value[..cut]
}

/// `k=v,k=v`: the `OTEL_RESOURCE_ATTRIBUTES` form of encoded pairs.
pub(super) fn join_attributes(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}={v}");
    }
    out
}

/// Appends the attributes whose keys the container's own value does not set. `None` when
/// there is nothing to add.
pub(super) fn merge_attributes(own: &str, ours: &[(String, String)]) -> Option<(String, usize)> {
    let own_keys: Vec<&str> = own
        .split(',')
        .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    let missing: Vec<(String, String)> = ours
        .iter()
        .filter(|(k, _)| !own_keys.contains(&k.as_str()))
        .cloned()
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut merged = own.trim_end_matches([',', ' ']).to_owned();
    merged.push(',');
    merged.push_str(&join_attributes(&missing));
    Some((merged, missing.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_percent_encoded() {
        assert_eq!(encode_attribute("a,b=c %$+"), "a%2Cb%3Dc%20%25%24%2B");
        assert_eq!(
            encode_attribute("https://github.com/acme/shop"),
            "https://github.com/acme/shop"
        );
    }

    /// D1: a value of any length is written in at most 255 bytes, never cutting an escape.
    #[test]
    fn attribute_values_are_bounded() {
        for raw in [
            ",".repeat(22 * 1024),
            "a".repeat(1000),
            format!("a{}", ",".repeat(300)),
            format!("ab{}", ",".repeat(300)),
            "é".repeat(300),
        ] {
            let encoded = encode_attribute(&raw);
            assert!(encoded.len() <= ATTRIBUTE_VALUE_MAX, "{}", encoded.len());
            assert!(encoded.len() > ATTRIBUTE_VALUE_MAX - 6, "{}", encoded.len());
            let decoded = percent_encoding::percent_decode_str(&encoded).decode_utf8_lossy();
            assert!(raw.starts_with(decoded.as_ref()), "{encoded}");
        }
        assert_eq!(clip("éé", 3), "é");
    }

    #[test]
    fn merge_keeps_the_containers_keys() {
        let ours = vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ];
        assert_eq!(
            merge_attributes("b=mine", &ours),
            Some(("b=mine,a=1".to_owned(), 1))
        );
        assert_eq!(merge_attributes("a=x, b=y", &ours), None);
    }
}
