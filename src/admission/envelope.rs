//! The `admission.k8s.io/v1` AdmissionReview envelope, shared by the mutating review
//! ([`super::review`]) and the validating webhook ([`super::validate`]): the request and
//! response shapes, the envelope's constants and the [`BadRequest`] a body that is not one gets,
//! the envelope check, and the two ways text leaves the webhook (decoding errors without the
//! values they quote, warnings within the API server's bound).

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Why a body is not something we can answer with an AdmissionReview (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    #[error("empty body: expected an admission.k8s.io/v1 AdmissionReview")]
    Empty,
    #[error("malformed JSON: {0}")]
    Json(String),
    /// The envelope's `field` is not `expected`. The value received is not kept: a caller's
    /// string there (a token, say) must not come back in the reply or the log.
    #[error("{field}: expected {expected}")]
    NotAdmissionReview {
        field: &'static str,
        expected: &'static str,
    },
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview request has no uid")]
    NoUid,
}

/// Warnings reach the user who created the pod; the API server asks for 120 characters at most.
const WARNING_MAX: usize = 120;
const WARNING_PREFIX: &str = "lightstep-tekton: ";

/// The review as decoded. `O` is the object: the pod itself on the fast path, or its raw JSON
/// when the fast path failed and the reason must be found (see [`review`]).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ReviewIn<O> {
    #[serde(default)]
    pub(super) api_version: String,
    #[serde(default)]
    pub(super) kind: String,
    pub(super) request: Option<RequestIn<O>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RequestIn<O> {
    #[serde(default)]
    pub(super) uid: String,
    pub(super) kind: Option<GroupVersionKind>,
    #[serde(default)]
    pub(super) namespace: Option<String>,
    #[serde(default)]
    pub(super) operation: Option<String>,
    #[serde(default)]
    pub(super) sub_resource: Option<String>,
    pub(super) object: Option<O>,
}

#[derive(Deserialize)]
pub(super) struct GroupVersionKind {
    #[serde(default)]
    pub(super) group: String,
    #[serde(default)]
    pub(super) kind: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ReviewOut<'a> {
    pub(super) api_version: &'static str,
    pub(super) kind: &'static str,
    pub(super) response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ResponseOut<'a> {
    pub(super) uid: &'a str,
    pub(super) allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) status: Option<StatusOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) patch: Option<String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub(super) warnings: &'a [String],
}

#[derive(Serialize)]
pub(super) struct StatusOut {
    pub(super) status: &'static str,
    pub(super) code: u16,
    pub(super) reason: &'static str,
    pub(super) message: String,
}

/// Checks the envelope: a v1 AdmissionReview with a request that has a uid. A wrong envelope
/// is named by its field and the expected value, never by the value received.
pub(super) fn open<O>(review: ReviewIn<O>) -> Result<RequestIn<O>, BadRequest> {
    if review.api_version != API_VERSION {
        return Err(BadRequest::NotAdmissionReview {
            field: "apiVersion",
            expected: API_VERSION,
        });
    }
    if review.kind != KIND {
        return Err(BadRequest::NotAdmissionReview {
            field: "kind",
            expected: KIND,
        });
    }
    let request = review.request.ok_or(BadRequest::NoRequest)?;
    if request.uid.is_empty() {
        return Err(BadRequest::NoUid);
    }
    Ok(request)
}

/// A decoding error without the values it quotes. serde's messages quote the offending string
/// (`invalid type: string "…", expected a sequence`), and these messages go to the log and to
/// the caller: whatever a caller put in a mistyped field (a token, megabytes of text) must not be
/// copied there. Found by the secret-grep test in tests/server.rs.
pub(super) fn without_values(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let mut out = String::with_capacity(message.len().min(256));
    let mut quote = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => {
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None => {
                if c == '"' || c == '`' {
                    out.push(c);
                    out.push('…');
                    quote = Some(c);
                } else {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Prefixes a warning with the webhook's name and keeps it within the API server's guideline.
pub(super) fn warning(message: &str) -> String {
    let mut w = format!("{WARNING_PREFIX}{message}");
    if w.len() > WARNING_MAX {
        let mut cut = WARNING_MAX - 3;
        while !w.is_char_boundary(cut) {
            cut -= 1;
        }
        w.truncate(cut);
        w.push_str("...");
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_prefixed_and_short() {
        let w = warning(&"x".repeat(300));
        assert!(w.len() <= WARNING_MAX && w.starts_with(WARNING_PREFIX));
    }
}
