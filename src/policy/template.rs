//! The `serviceName` template: literal text and `{a|b|c}` placeholders, parsed once at load.

use serde::Serialize;

/// Placeholders a `serviceName` template may use, each naming a fact read off the pod.
pub const TEMPLATE_FIELDS: &[&str] = &[
    "pipeline",
    "pipelineRun",
    "pipelineTask",
    "task",
    "taskRun",
    "namespace",
];

/// A parsed `serviceName` template: literal text and `{a|b|c}` placeholders, where the first
/// field that is known on the pod is used.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceNameTemplate {
    source: String,
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TemplatePart {
    Literal(String),
    /// Alternatives, each one of [`TEMPLATE_FIELDS`].
    Field(Vec<&'static str>),
}

impl ServiceNameTemplate {
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {source:?}"))?;
            let inner = &after[..close];
            let mut fields = Vec::new();
            for name in inner.split('|') {
                let name = name.trim();
                let known = TEMPLATE_FIELDS
                    .iter()
                    .find(|f| **f == name)
                    .ok_or_else(|| {
                        format!(
                            "unknown placeholder {{{name}}}; use one of {}",
                            TEMPLATE_FIELDS.join(", ")
                        )
                    })?;
                fields.push(*known);
            }
            parts.push(TemplatePart::Field(fields));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched '}}' in {source:?}"));
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("must not be empty".to_owned());
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn parts(&self) -> &[TemplatePart] {
        &self.parts
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl Serialize for ServiceNameTemplate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_alternatives_and_literals() {
        let t = ServiceNameTemplate::parse("ci-{pipeline|task}").unwrap();
        assert_eq!(
            t.parts(),
            &[
                TemplatePart::Literal("ci-".into()),
                TemplatePart::Field(vec!["pipeline", "task"])
            ]
        );
        assert!(ServiceNameTemplate::parse("").is_err());
        assert!(ServiceNameTemplate::parse("a}").is_err());
    }
}
