//! W3C trace context: the id types, `traceparent` and `tracestate`, and Tekton's span-context
//! carriers. Pure.

use std::fmt;

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
}
