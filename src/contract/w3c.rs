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

/// A `tracestate` list as checked against the W3C grammar: the valid members, and which were
/// dropped and why.
///
/// The choice: only invalid members are dropped (Trace Context §4.3 lets a vendor discard the
/// whole header or only its invalid entries); the other vendors' state is kept. The whole list is
/// dropped only when it is longer than 512 characters. Members are named by position and reason,
/// never by their text: a value read off a pod is not echoed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracestate {
    /// The valid members, joined with `,`; `None` when none is left.
    pub value: Option<String>,
    pub dropped: Vec<DroppedMember>,
}

/// One `tracestate` list member that was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedMember {
    /// Its 1-based position in the list; 0 for the whole list.
    pub position: usize,
    pub reason: &'static str,
}

impl fmt::Display for DroppedMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            0 => write!(f, "the whole list: {}", self.reason),
            n => write!(f, "member {n}: {}", self.reason),
        }
    }
}

/// Checks a `tracestate` value against the W3C Trace Context grammar:
///
/// ```text
/// list        = list-member 0*31( OWS "," OWS list-member )
/// list-member = key "=" value
/// key         = simple-key / multi-tenant-key
/// simple-key  = lcalpha 0*255( lcalpha / DIGIT / "_" / "-" / "*" / "/" )
/// multi-tenant-key = tenant-id "@" system-id
/// tenant-id   = ( lcalpha / DIGIT ) 0*240( lcalpha / DIGIT / "_" / "-" / "*" / "/" )
/// system-id   = lcalpha 0*13( lcalpha / DIGIT / "_" / "-" / "*" / "/" )
/// value       = 0*255( chr ) nblk-chr   ; printable ASCII but "," and "=", not ending in " "
/// ```
///
/// Empty members are allowed and skipped; a repeated key and members past the 32nd are dropped.
pub fn parse_tracestate(value: &str) -> Tracestate {
    if value.len() > TRACESTATE_MAX_LEN {
        return Tracestate {
            value: None,
            dropped: vec![DroppedMember {
                position: 0,
                reason: "longer than 512 characters",
            }],
        };
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut keys: Vec<&str> = Vec::new();
    let mut dropped = Vec::new();
    for (index, member) in value.split(',').enumerate() {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let reason = match member.split_once('=') {
            None => Some("not key=value"),
            Some((key, _)) if !valid_key(key) => Some(
                "key is not lowercase letters, digits and _-*/ (or tenant@system), \
                 starting with a letter",
            ),
            Some((_, value)) if !valid_value(value) => Some(
                "value is not 1 to 256 printable characters other than ',' and '=', \
                 not ending in a space",
            ),
            Some((key, _)) if keys.contains(&key) => Some("repeats an earlier key"),
            Some(_) if kept.len() == TRACESTATE_MAX_MEMBERS => Some("past the 32-member limit"),
            Some((key, _)) => {
                keys.push(key);
                kept.push(member);
                None
            }
        };
        if let Some(reason) = reason {
            dropped.push(DroppedMember {
                position: index + 1,
                reason,
            });
        }
    }
    Tracestate {
        value: (!kept.is_empty()).then(|| kept.join(",")),
        dropped,
    }
}

/// The longest `tenant-id` and `system-id` of a multi-tenant key (W3C: 241 and 14 characters).
const TENANT_ID_MAX: usize = 241;
const SYSTEM_ID_MAX: usize = 14;
/// The longest simple key and the longest value (W3C: 256 characters each).
const KEY_MAX: usize = 256;
const VALUE_MAX: usize = 256;

fn valid_key(key: &str) -> bool {
    let key_char = |b: &u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/');
    let starts = |part: &str, digit_ok: bool| {
        part.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || (digit_ok && b.is_ascii_digit()))
    };
    match key.split_once('@') {
        None => key.len() <= KEY_MAX && starts(key, false) && key.as_bytes().iter().all(key_char),
        Some((tenant, system)) => {
            tenant.len() <= TENANT_ID_MAX
                && system.len() <= SYSTEM_ID_MAX
                && starts(tenant, true)
                && starts(system, false)
                && tenant.as_bytes().iter().all(key_char)
                && system.as_bytes().iter().all(key_char)
        }
    }
}

fn valid_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= VALUE_MAX
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
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
        .and_then(|s| parse_tracestate(s.trim()).value);
    Ok(SpanContext {
        trace_id,
        parent_id,
        flags,
        tracestate,
    })
}

/// The `tracestate` of Tekton's span-context annotation as [`parse_tracestate`] reads it, for
/// explaining what [`parse_span_context_annotation`] kept; empty when there is none.
pub fn annotation_tracestate(json: &str) -> Tracestate {
    #[derive(serde::Deserialize)]
    struct Carrier {
        tracestate: Option<serde_json::Value>,
    }
    serde_json::from_str::<Carrier>(json)
        .ok()
        .and_then(|c| c.tracestate)
        .and_then(|v| v.as_str().map(|s| parse_tracestate(s.trim())))
        .unwrap_or_default()
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

    fn kept(value: &str) -> Option<String> {
        parse_tracestate(value).value
    }

    #[test]
    fn tracestate_rules() {
        let valid = "ls=abc,congo=t61rcWkgMzE, rojo=00f067aa0ba902b7 ,t4@vendor=x y!";
        assert_eq!(parse_tracestate(valid).dropped, Vec::new());
        assert_eq!(
            kept(valid).as_deref(),
            Some("ls=abc,congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,t4@vendor=x y!")
        );
        assert_eq!(kept(""), None);
        assert_eq!(kept(" , ,"), None);
        assert_eq!(kept("novalue"), None);
        assert_eq!(kept("a=b\n"), None);
        assert_eq!(kept(&format!("a={}", "x".repeat(600))), None);
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        let parsed = parse_tracestate(&members.join(","));
        assert_eq!(parsed.value.unwrap().split(',').count(), 32);
        assert_eq!(parsed.dropped[0].position, 33);
    }

    /// D8: the W3C key and value grammar; only the invalid members are dropped, each named by
    /// position and reason, never by its text.
    #[test]
    fn tracestate_drops_invalid_members_only() {
        for (list, expected, positions) in [
            ("ABC=d=e", None, vec![1]),
            ("\"x\"=<script>", None, vec![1]),
            (
                "ls=1,ABC=d=e,\"x\"=<script>,ok=2",
                Some("ls=1,ok=2"),
                vec![2, 3],
            ),
            ("a=b=c", None, vec![1]),
            ("a=b,a=c", Some("a=b"), vec![2]),
            ("a=", None, vec![1]),
            ("a=b ", Some("a=b"), vec![]),
            ("1a=b", None, vec![1]),
            ("1a@sys=b", Some("1a@sys=b"), vec![]),
            ("a@Sys=b", None, vec![1]),
            ("a@b@c=d", None, vec![1]),
            ("a@abcdefghijklmno=b", None, vec![1]),
            ("a=b\u{7f}", None, vec![1]),
        ] {
            let parsed = parse_tracestate(list);
            assert_eq!(parsed.value.as_deref(), expected, "{list:?}");
            let got: Vec<usize> = parsed.dropped.iter().map(|d| d.position).collect();
            assert_eq!(got, positions, "{list:?}");
            for d in &parsed.dropped {
                let text = d.to_string();
                assert!(!text.contains("script") && !text.contains("ABC"), "{text}");
            }
        }
        assert!(valid_key(&format!("a{}", "b".repeat(255))));
        assert!(!valid_key(&format!("a{}", "b".repeat(256))));
        assert!(valid_value(&"v".repeat(256)));
        assert!(!valid_value(&"v".repeat(257)));
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

        let json = r#"{"traceparent":"00-d22941a3ef1cc2446bcdf5850960f941-c99c7108eeb58e76-01","tracestate":"ls=1,ABC=d=e"}"#;
        let c = parse_span_context_annotation(json).unwrap();
        assert_eq!(c.tracestate.as_deref(), Some("ls=1"));
        assert_eq!(annotation_tracestate(json).dropped[0].position, 2);
        assert_eq!(annotation_tracestate("{}"), Tracestate::default());
    }
}
