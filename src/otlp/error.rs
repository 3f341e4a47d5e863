//! What a failed export reports: a stable cause label, whether trying again may help, and a
//! short description that never carries the token.

use std::fmt;

/// Why an export failed, as a short stable label (`as_str`) fit for a Prometheus label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The receiver is down or overloaded (HTTP 502/503/504, gRPC UNAVAILABLE).
    Unavailable,
    /// The receiver asked us to slow down (HTTP 429, gRPC RESOURCE_EXHAUSTED).
    Throttled,
    /// The receiver refused the request itself (other 4xx, INVALID_ARGUMENT and the like).
    Rejected,
    /// The token is missing, wrong or not allowed (HTTP 401/403, UNAUTHENTICATED,
    /// PERMISSION_DENIED).
    Unauthenticated,
    /// An attempt ran past its timeout (ours, or the server's DEADLINE_EXCEEDED).
    Timeout,
    /// Connecting or talking failed below HTTP: refused, reset, DNS, a broken stream.
    Transport,
    /// The TLS handshake failed: an untrusted or mismatched certificate, no common protocol.
    Tls,
    /// The receiver failed on its side (HTTP 500, gRPC INTERNAL, ABORTED, DATA_LOSS).
    Server,
}

impl Cause {
    /// Every cause, in label order: what metrics initialise to 0. `as_str`'s match stops
    /// compiling when a variant is added; add it here too.
    pub const ALL: [Cause; 8] = [
        Cause::Unavailable,
        Cause::Throttled,
        Cause::Rejected,
        Cause::Unauthenticated,
        Cause::Timeout,
        Cause::Transport,
        Cause::Tls,
        Cause::Server,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Unavailable => "unavailable",
            Cause::Throttled => "throttled",
            Cause::Rejected => "rejected",
            Cause::Unauthenticated => "unauthenticated",
            Cause::Timeout => "timeout",
            Cause::Transport => "transport",
            Cause::Tls => "tls",
            Cause::Server => "server",
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed export, after the retries the policy allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    cause: Cause,
    retryable: bool,
    attempts: u32,
    detail: String,
}

impl ExportError {
    pub(crate) fn new(failure: Failure, attempts: u32) -> Self {
        Self {
            cause: failure.cause,
            retryable: failure.retryable,
            attempts,
            detail: failure.detail,
        }
    }

    pub fn cause(&self) -> Cause {
        self.cause
    }

    /// Whether the last failure was of a kind that may go away: a caller that keeps the batch
    /// (the exporter controller) may send it again later; a permanent failure will fail again.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Attempts made, the first included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable {
            "retryable"
        } else {
            "permanent"
        };
        write!(
            f,
            "OTLP export failed ({}, {kind}) after {} attempt(s): {}",
            self.cause, self.attempts, self.detail
        )
    }
}

impl std::error::Error for ExportError {}

/// One attempt's failure, before the retry loop decides what to do with it.
#[derive(Debug)]
pub(crate) struct Failure {
    pub cause: Cause,
    pub retryable: bool,
    /// Built only from status codes, error kinds and [`clip`]ped server text.
    pub detail: String,
    /// The wait the server asked for (`Retry-After`, RetryInfo).
    pub server_delay: Option<std::time::Duration>,
}

impl Failure {
    pub fn new(cause: Cause, retryable: bool, detail: String) -> Self {
        Self {
            cause,
            retryable,
            detail,
            server_delay: None,
        }
    }
}

/// How much of a server's error message is kept: enough for "span 3 has 2000 attributes, the
/// limit is 128", short enough that a log line stays one line.
const MESSAGE_LIMIT: usize = 200;

/// A server's error text made safe to log: control characters escaped, clipped to
/// [`MESSAGE_LIMIT`] characters, and any copy of the token (a receiver that echoes the request
/// headers back) replaced.
pub(crate) fn clip(text: &str, token: Option<&[u8]>) -> String {
    let mut text = text.to_owned();
    if let Some(token) = token.and_then(|t| std::str::from_utf8(t).ok())
        && !token.is_empty()
    {
        text = text.replace(token, "<token>");
    }
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == MESSAGE_LIMIT {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_escapes_clips_and_hides_the_token() {
        assert_eq!(clip("bad\nspan", None), "bad\\nspan");
        assert_eq!(
            clip(
                "header lightstep-access-token: s3cr3t was refused",
                Some(b"s3cr3t")
            ),
            "header lightstep-access-token: <token> was refused"
        );
        let long = "x".repeat(1000);
        assert_eq!(clip(&long, None).chars().count(), MESSAGE_LIMIT + 1);
    }

    #[test]
    fn labels_are_stable() {
        let labels: Vec<_> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            labels,
            [
                "unavailable",
                "throttled",
                "rejected",
                "unauthenticated",
                "timeout",
                "transport",
                "tls",
                "server"
            ]
        );
    }
}
