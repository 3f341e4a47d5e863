//! A variable the policy wants in a container ([`Desired`]) and the kind of variable it is
//! ([`Group`]): the vocabulary `env` plans with and `exporter` contributes to.

use serde_json::Value;

use super::literal;

/// What one kind of variable is, for the precedence rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Group {
    /// Per-run trace context: injected unless the container defines it.
    TraceContext,
    /// A setting: yields to the container and (with `envFrom: preserve`) to `envFrom`.
    Setting,
    /// `OTEL_RESOURCE_ATTRIBUTES`: merged with the container's value.
    Attributes,
    /// The exporter: yields as a group; governed in enforce mode.
    Exporter,
}

pub(super) struct Desired {
    pub(super) name: &'static str,
    pub(super) value: Value,
    pub(super) group: Group,
}

impl Desired {
    pub(super) fn literal(name: &'static str, value: &str, group: Group) -> Desired {
        Desired {
            name,
            value: literal(name, value),
            group,
        }
    }
}
