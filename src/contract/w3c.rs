//! W3C trace context: parsing Tekton's span context, deriving ids from run uids, sampling.
//!
//! The derivation is a published contract (README, "How trace ids are chosen"): a component
//! that emits spans for PipelineRuns and TaskRuns later must compute the same ids from the same
//! uids, so the constants below never change without a new version tag in the hashed prefix.
//! Everything here is pure.

use std::fmt;

use sha2::{Digest, Sha256};

/// Hashed before a run uid to derive a trace id. Versioned so the scheme can change safely.
const TRACE_ID_DOMAIN: &[u8] = b"lightstep-tekton-webhook/trace-id/v1\n";
/// Hashed before a TaskRun uid and retry number to derive the TaskRun's span id.
const SPAN_ID_DOMAIN: &[u8] = b"lightstep-tekton-webhook/span-id/v1\n";

/// The W3C limit on the length of a `tracestate` value.
const TRACESTATE_MAX_LEN: usize = 512;
/// The W3C limit on the number of `tracestate` list members.
const TRACESTATE_MAX_MEMBERS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// The context handed to every step: `TRACEPARENT` (and `TRACESTATE` when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    /// The span the steps' spans become children of.
    pub parent_id: SpanId,
    pub flags: u8,
    pub tracestate: Option<String>,
}

impl SpanContext {
    /// `00-<trace-id>-<parent-id>-<flags>`.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }

    pub fn sampled(&self) -> bool {
        self.flags & 0x01 == 0x01
    }
}

/// Why a carrier was not used (it is never an error: the webhook derives ids instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// Parses a W3C `traceparent` header value. Unknown future versions are accepted as the
/// specification asks (their first four fields read as version 00); version `ff`, uppercase hex
/// and all-zero ids are refused.
pub fn parse_traceparent(value: &str) -> Result<(TraceId, SpanId, u8), Malformed> {
    let value = value.trim();
    let bytes = value.as_bytes();
    if bytes.len() < 55 {
        return Err(Malformed(format!(
            "traceparent is {} characters, expected 55",
            bytes.len()
        )));
    }
    let version = hex_byte(&bytes[0..2]).ok_or_else(|| Malformed("bad version".into()))?;
    if version == 0xff {
        return Err(Malformed("version ff is invalid".into()));
    }
    if version == 0 && bytes.len() != 55 {
        return Err(Malformed("version 00 must be exactly 55 characters".into()));
    }
    if bytes.len() > 55 && bytes[55] != b'-' {
        return Err(Malformed("trailing data after flags".into()));
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return Err(Malformed("fields must be separated by '-'".into()));
    }
    let mut trace = [0u8; 16];
    decode_hex(&bytes[3..35], &mut trace)
        .ok_or_else(|| Malformed("trace id is not 32 lowercase hex digits".into()))?;
    let mut span = [0u8; 8];
    decode_hex(&bytes[36..52], &mut span)
        .ok_or_else(|| Malformed("parent id is not 16 lowercase hex digits".into()))?;
    let flags = hex_byte(&bytes[53..55]).ok_or_else(|| Malformed("bad flags".into()))?;
    if trace == [0; 16] {
        return Err(Malformed("trace id is all zeros".into()));
    }
    if span == [0; 8] {
        return Err(Malformed("parent id is all zeros".into()));
    }
    Ok((TraceId(trace), SpanId(span), flags))
}

/// Checks a `tracestate` value against the W3C limits (length, member count, printable ASCII,
/// `key=value` members). An invalid one is dropped, not repaired.
pub fn valid_tracestate(value: &str) -> bool {
    if value.is_empty() || value.len() > TRACESTATE_MAX_LEN {
        return false;
    }
    if !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return false;
    }
    let mut members = 0;
    for member in value.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        members += 1;
        match member.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() && !k.contains(' ') => {}
            _ => return false,
        }
    }
    members > 0 && members <= TRACESTATE_MAX_MEMBERS
}

/// Reads Tekton's span-context annotation: a JSON object of propagation headers,
/// `{"traceparent": "...", "tracestate": "..."}`.
pub fn parse_span_context_annotation(json: &str) -> Result<SpanContext, Malformed> {
    let carrier: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| Malformed(format!("not a JSON object: {e}")))?;
    let traceparent = carrier
        .get("traceparent")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Malformed("no traceparent".into()))?;
    let (trace_id, parent_id, flags) = parse_traceparent(traceparent)?;
    let tracestate = carrier
        .get("tracestate")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .filter(|s| valid_tracestate(s))
        .map(str::to_owned);
    Ok(SpanContext {
        trace_id,
        parent_id,
        flags,
        tracestate,
    })
}

/// The trace id of a run: all TaskRuns of one PipelineRun pass the PipelineRun uid and so share
/// one trace. `SHA-256(TRACE_ID_DOMAIN || uid)`, first 16 bytes.
pub fn derive_trace_id(run_uid: &str) -> TraceId {
    let digest = Sha256::new()
        .chain_update(TRACE_ID_DOMAIN)
        .chain_update(run_uid.as_bytes())
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    if id == [0; 16] {
        // W3C forbids the all-zero id; the odds are 2^-128, but the contract must be total.
        id[15] = 1;
    }
    TraceId(id)
}

/// The span id of one attempt of a TaskRun (retries get their own span):
/// `SHA-256(SPAN_ID_DOMAIN || taskRunUID || "/" || retry)`, first 8 bytes, retry in decimal.
pub fn derive_span_id(task_run_uid: &str, retry: u32) -> SpanId {
    let digest = Sha256::new()
        .chain_update(SPAN_ID_DOMAIN)
        .chain_update(task_run_uid.as_bytes())
        .chain_update(b"/")
        .chain_update(retry.to_string().as_bytes())
        .finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    SpanId(id)
}

/// The sampling decision for a trace, the same one OpenTelemetry's `TraceIdRatioBased` sampler
/// makes (Go and Rust SDKs): the low 8 bytes of the trace id, big-endian, shifted right by one,
/// compared with `ratio * 2^63`. Every pod of a run therefore agrees, and so does an SDK
/// configured with the same ratio.
pub fn sampled(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id.0[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    Some(hex_nibble(pair[0])? << 4 | hex_nibble(pair[1])?)
}

fn decode_hex(src: &[u8], dst: &mut [u8]) -> Option<()> {
    for (i, out) in dst.iter_mut().enumerate() {
        *out = hex_byte(&src[2 * i..2 * i + 2])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_traceparent() {
        let (t, s, f) =
            parse_traceparent("00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01").unwrap();
        assert_eq!(t.to_string(), "d22941a3ef1cc2446bcdf5850960f941");
        assert_eq!(s.to_string(), "c99c7108eeb58e76");
        assert_eq!(f, 1);
    }

    #[test]
    fn refuses_malformed_traceparents() {
        for bad in [
            "",
            "00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76",
            "00-D22941A3EF1CC2446BCDF5850960F941-c99c7108eeb58e76-01",
            "00-00000000000000000000000000000000-c99c7108eeb58e76-01",
            "00-d22941a3ef1cc2446bcdf5850960f941-0000000000000000-01",
            "ff-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01",
            "00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01-extra",
            "00_d22941a3ef1cc2446bcdf5850960f941_c99c7108eeb58e76_01",
            "00-d22941a3ef1cc2446bcdf5850960f94g-c99c7108eeb58e76-01",
            "0x-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01",
        ] {
            assert!(parse_traceparent(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn accepts_future_versions_with_extra_fields() {
        assert!(
            parse_traceparent("01-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01-abc")
                .is_ok()
        );
        assert!(
            parse_traceparent("01-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01xabc")
                .is_err()
        );
    }

    #[test]
    fn tracestate_rules() {
        assert!(valid_tracestate("ls=abc,congo=t61rcWkgMzE"));
        assert!(!valid_tracestate(""));
        assert!(!valid_tracestate("novalue"));
        assert!(!valid_tracestate("a=b\n"));
        assert!(!valid_tracestate(&"a=b,".repeat(33)));
        assert!(!valid_tracestate(&format!("a={}", "x".repeat(600))));
    }

    #[test]
    fn annotation_carrier() {
        let c = parse_span_context_annotation(
            r#"{"traceparent":"00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01","tracestate":"ls=1"}"#,
        )
        .unwrap();
        assert_eq!(c.tracestate.as_deref(), Some("ls=1"));
        assert!(c.sampled());
        assert!(parse_span_context_annotation("{}").is_err());
        assert!(parse_span_context_annotation("not json").is_err());
        assert!(parse_span_context_annotation(r#"{"traceparent":5}"#).is_err());
    }

    /// The derivation is a contract with other components: these values must never change.
    #[test]
    fn derivation_is_stable() {
        let t = derive_trace_id("59eb5727-df8e-49fc-a564-75a1aef1d8df");
        let s = derive_span_id("f51a1622-7726-451e-82d4-1422e51dfa8e", 0);
        assert_eq!(t, derive_trace_id("59eb5727-df8e-49fc-a564-75a1aef1d8df"));
        assert_ne!(s, derive_span_id("f51a1622-7726-451e-82d4-1422e51dfa8e", 1));
        assert_ne!(t, derive_trace_id("f51a1622-7726-451e-82d4-1422e51dfa8e"));
        // Pinned values: recompute with `printf '%s%s' "$DOMAIN" "$UID" | sha256sum`.
        assert_eq!(t.to_string(), PINNED_TRACE_ID);
        assert_eq!(s.to_string(), PINNED_SPAN_ID);
    }

    const PINNED_TRACE_ID: &str = "f3739f264459e0240e4b8665a676ca9d";
    const PINNED_SPAN_ID: &str = "67ed4606d2753ce7";

    #[test]
    fn sampling_matches_the_ratio_sampler() {
        let low = TraceId([0xff; 16]);
        let high_bits_zero = TraceId([0; 16]);
        assert!(sampled(low, 1.0));
        assert!(!sampled(low, 0.0));
        assert!(!sampled(high_bits_zero, 0.0));
        assert!(sampled(high_bits_zero, 0.01));
        assert!(!sampled(low, 0.99));
        // Roughly the ratio over many derived ids.
        let n = 4000;
        let hits = (0..n)
            .filter(|i| sampled(derive_trace_id(&format!("uid-{i}")), 0.25))
            .count();
        assert!((800..1200).contains(&hits), "{hits} of {n} sampled at 0.25");
    }
}
