//! Why a TracingPolicy cannot be applied ([`Invalid`]): the field and the reason, shared by the
//! resource's decoding and the namespace selector's compilation.

/// Why a TracingPolicy cannot be applied. The field is a path in the object (`spec.sampling.ratio`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
    /// `InvalidSpec` (decodes, does not validate) or `Undecodable` (does not match the schema).
    pub kind: InvalidKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidKind {
    Undecodable,
    InvalidSpec,
}

impl InvalidKind {
    /// The condition reason (CamelCase, as Kubernetes conventions ask).
    pub fn reason(self) -> &'static str {
        match self {
            InvalidKind::Undecodable => "Undecodable",
            InvalidKind::InvalidSpec => "InvalidSpec",
        }
    }
}

pub(super) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
        kind: InvalidKind::InvalidSpec,
    }
}

impl Invalid {
    /// The same error, its field now a path below `parent`.
    pub(super) fn within(mut self, parent: &str) -> Invalid {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}
