//! Which OTLP failures are tried again, and how long to wait before the next attempt.
//!
//! The rules are the OTLP specification's (REFERENCE.md section 4): HTTP 429, 502, 503 and 504
//! are retryable and `Retry-After` is honoured; gRPC CANCELLED, DEADLINE_EXCEEDED, ABORTED,
//! OUT_OF_RANGE, UNAVAILABLE and DATA_LOSS are retryable, and RESOURCE_EXHAUSTED only when the
//! server sent `google.rpc.RetryInfo` in the status details (otherwise the server is saying "this
//! will never fit", not "later"). Everything else is permanent. Everything here is pure, so the
//! rules are tested without a network; the jitter comes in as a number from the caller.
//!
//! Trade-off: `Retry-After` is read in its delay-seconds form only. The HTTP-date form would
//! need a date parser and a trustworthy clock for a rarely used variant; a date falls back to
//! our own backoff, which is what a server that sends no hint gets anyway.

use std::time::Duration;

use prost::Message as _;

use super::error::Cause;

/// How often and how patiently a failed export is tried again.
///
/// The defaults follow the OpenTelemetry SDKs' OTLP exporters (five attempts, first wait about
/// a second, waits capped at five seconds): enough to ride out a collector's rolling restart
/// or a load balancer's brief 503s, short enough (about 12 s of waiting in all) that a batch
/// is not still being retried when the next one is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; 1 turns retries off.
    pub max_attempts: u32,
    /// The wait before the first retry; it doubles for each further retry.
    pub initial_backoff: Duration,
    /// No computed wait is longer than this.
    pub max_backoff: Duration,
    /// The longest wait a server may ask for (`Retry-After`, gRPC RetryInfo). A larger request is
    /// cut down to this, so one throttling reply cannot park the exporter for an hour.
    pub max_server_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            // Five attempts as in the OpenTelemetry SDKs' OTLP retry defaults.
            max_attempts: 5,
            // One second: long enough for a restarting collector pod to be replaced by
            // another endpoint behind its Service, short enough not to delay a lone blip.
            initial_backoff: Duration::from_secs(1),
            // Five seconds, the SDKs' cap: waits go 1, 2, 4, 5 s before jitter.
            max_backoff: Duration::from_secs(5),
            // Thirty seconds: Lightstep and collectors ask for seconds, not minutes; beyond
            // this the batch is better dropped (and counted) than held.
            max_server_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry).
    ///
    /// A delay the server asked for wins, capped at `max_server_delay`. Otherwise the wait is
    /// `initial_backoff` doubled per retry, capped at `max_backoff`, with "equal jitter": half
    /// of it fixed and half scaled by `unit` (a random number in `[0, 1)` from the caller), so
    /// many exporters that failed together do not all come back in the same instant.
    pub fn delay(&self, retry: u32, server_delay: Option<Duration>, unit: f64) -> Duration {
        if let Some(asked) = server_delay {
            return asked.min(self.max_server_delay);
        }
        // 2^31 times any backoff is already past every sensible cap; the shift cannot overflow.
        let factor = 1u32 << retry.saturating_sub(1).min(31);
        let full = self
            .initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff);
        let half = full / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// The cause label and retryability of an HTTP status that is not a success.
pub(crate) fn http_status(status: u16) -> (Cause, bool) {
    match status {
        429 => (Cause::Throttled, true),
        502..=504 => (Cause::Unavailable, true),
        401 | 403 => (Cause::Unauthenticated, false),
        500..=599 => (Cause::Server, false),
        _ => (Cause::Rejected, false),
    }
}

/// The cause label and retryability of a gRPC status sent by the server.
pub(crate) fn grpc_code(code: tonic::Code, has_retry_info: bool) -> (Cause, bool) {
    use tonic::Code;
    match code {
        Code::Unavailable => (Cause::Unavailable, true),
        Code::DeadlineExceeded => (Cause::Timeout, true),
        Code::ResourceExhausted => (Cause::Throttled, has_retry_info),
        Code::Cancelled | Code::Aborted | Code::DataLoss => (Cause::Server, true),
        Code::OutOfRange => (Cause::Rejected, true),
        Code::Unauthenticated | Code::PermissionDenied => (Cause::Unauthenticated, false),
        Code::Internal | Code::Unknown => (Cause::Server, false),
        _ => (Cause::Rejected, false),
    }
}

/// The delay in a `Retry-After` header's delay-seconds form.
pub(crate) fn retry_after(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    text.parse::<u64>().ok().map(Duration::from_secs)
}

/// The delay a gRPC server put in `google.rpc.RetryInfo` inside the status details
/// (`grpc-status-details-bin`, a serialized `google.rpc.Status`), if it sent one.
///
/// `Some(ZERO)` when RetryInfo is there without a delay: the server still said "retry".
pub(crate) fn retry_info_delay(details: &[u8]) -> Option<Duration> {
    if details.is_empty() {
        return None;
    }
    let status = RpcStatus::decode(details).ok()?;
    let info = status
        .details
        .iter()
        .find(|any| any.type_url.ends_with(RETRY_INFO_TYPE))?;
    let info = RetryInfo::decode(info.value.as_slice()).ok()?;
    let delay = info.retry_delay.unwrap_or_default();
    let seconds = u64::try_from(delay.seconds).unwrap_or(0);
    let nanos = u32::try_from(delay.nanos).unwrap_or(0);
    Some(Duration::new(seconds, 0).saturating_add(Duration::from_nanos(u64::from(nanos))))
}

/// The message of a `google.rpc.Status` (the body OTLP/HTTP servers send with an error).
pub(crate) fn rpc_status_message(body: &[u8]) -> Option<String> {
    let status = RpcStatus::decode(body).ok()?;
    (!status.message.is_empty()).then_some(status.message)
}

/// The type URL suffix of `google.rpc.RetryInfo` (the prefix is usually
/// `type.googleapis.com/`, but only the name is fixed).
const RETRY_INFO_TYPE: &str = "/google.rpc.RetryInfo";

// The three Google API messages the retry rules read, declared by hand: pulling in a crate of
// all of Google's RPC types (tonic-types, prost-types) for three small messages would cost more
// compile time than these lines. Field numbers are those of google/rpc/status.proto,
// google/rpc/error_details.proto, google/protobuf/any.proto and duration.proto.

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<ProtoAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ProtoAny {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub(crate) struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            max_server_delay: Duration::from_secs(2),
        }
    }

    #[test]
    fn backoff_doubles_then_caps_and_jitter_stays_within_half() {
        let p = policy();
        assert_eq!(p.delay(1, None, 0.0), Duration::from_millis(50));
        assert_eq!(p.delay(1, None, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, None, 1.0), Duration::from_millis(200));
        assert_eq!(p.delay(3, None, 1.0), Duration::from_millis(350));
        assert_eq!(p.delay(3, None, 0.0), Duration::from_millis(175));
        // Far-out retries neither overflow nor pass the cap.
        assert_eq!(p.delay(u32::MAX, None, 1.0), Duration::from_millis(350));
    }

    #[test]
    fn a_server_delay_wins_but_is_capped() {
        let p = policy();
        let asked = Some(Duration::from_millis(1500));
        assert_eq!(p.delay(1, asked, 0.3), Duration::from_millis(1500));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), 0.3),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn http_statuses_follow_the_otlp_list() {
        for retryable in [429, 502, 503, 504] {
            assert!(http_status(retryable).1, "{retryable}");
        }
        for permanent in [400, 401, 403, 404, 413, 500, 501, 505] {
            assert!(!http_status(permanent).1, "{permanent}");
        }
        assert_eq!(http_status(503).0, Cause::Unavailable);
        assert_eq!(http_status(429).0, Cause::Throttled);
        assert_eq!(http_status(400).0, Cause::Rejected);
        assert_eq!(http_status(401).0, Cause::Unauthenticated);
    }

    #[test]
    fn grpc_codes_follow_the_otlp_list() {
        use tonic::Code;
        let retryable = [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ];
        for code in retryable {
            assert!(grpc_code(code, false).1, "{code:?}");
        }
        let permanent = [
            Code::Unknown,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::Unimplemented,
            Code::Internal,
            Code::Unauthenticated,
            Code::ResourceExhausted,
        ];
        for code in permanent {
            assert!(!grpc_code(code, false).1, "{code:?}");
        }
        assert!(grpc_code(Code::ResourceExhausted, true).1);
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        assert_eq!(retry_after(b"7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(b" 0 "), Some(Duration::ZERO));
        assert_eq!(retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after(b"-1"), None);
        assert_eq!(retry_after(&[0xff]), None);
    }

    fn details(type_url: &str, delay: Option<ProtoDuration>) -> Vec<u8> {
        RpcStatus {
            code: 8,
            message: "slow down".into(),
            details: vec![ProtoAny {
                type_url: type_url.into(),
                value: RetryInfo { retry_delay: delay }.encode_to_vec(),
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn retry_info_is_found_in_status_details() {
        let delay = ProtoDuration {
            seconds: 2,
            nanos: 500_000_000,
        };
        let bytes = details("type.googleapis.com/google.rpc.RetryInfo", Some(delay));
        assert_eq!(retry_info_delay(&bytes), Some(Duration::from_millis(2500)));
        let bare = details("type.googleapis.com/google.rpc.RetryInfo", None);
        assert_eq!(retry_info_delay(&bare), Some(Duration::ZERO));
        let other = details("type.googleapis.com/google.rpc.DebugInfo", Some(delay));
        assert_eq!(retry_info_delay(&other), None);
        assert_eq!(retry_info_delay(b""), None);
        assert_eq!(retry_info_delay(b"\xff\xff\xff"), None);
        let negative = ProtoDuration {
            seconds: -5,
            nanos: -1,
        };
        let bytes = details("type.googleapis.com/google.rpc.RetryInfo", Some(negative));
        assert_eq!(retry_info_delay(&bytes), Some(Duration::ZERO));
    }

    #[test]
    fn rpc_status_message_reads_the_error_body() {
        let body = RpcStatus {
            code: 3,
            message: "span too large".into(),
            details: vec![],
        }
        .encode_to_vec();
        assert_eq!(rpc_status_message(&body).as_deref(), Some("span too large"));
        assert_eq!(rpc_status_message(b""), None);
    }
}
