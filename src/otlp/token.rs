//! The access token: where it comes from, how a rotated Secret is noticed, and a type that
//! never shows it.
//!
//! A token file (a mounted Secret key) is read again on every export and compared with what
//! was read last: Kubernetes rotates a mounted Secret by swapping a `..data` symlink, so the
//! path is what counts, not an inode to watch. The file is a few dozen bytes and exports come
//! at most a few a second, so the read costs nothing worth a watcher. If a new read fails or
//! holds an unusable value, the last good token stays in use and one warning names the file.
//! An environment variable cannot change under a running process, so it is read once.

use std::fmt;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Mutex;

use hyper::header::{HeaderName, HeaderValue};

/// A token file longer than this is not a token (Lightstep's are under 100 bytes; 4 KiB leaves
/// room for any bearer-style credential) and is refused rather than read whole.
const MAX_TOKEN_BYTES: u64 = 4096;

/// Where the token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file, such as a mounted Secret key; re-read on each export.
    File(PathBuf),
    /// An environment variable, by name; read once.
    Env(String),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(path) => write!(f, "token file {}", path.display()),
            TokenSource::Env(name) => write!(f, "token variable {name}"),
        }
    }
}

/// Why a token could not be used. Names the source, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{from}: cannot read it ({kind})")]
    Read {
        from: TokenSource,
        kind: std::io::ErrorKind,
    },
    #[error("{0}: not set")]
    Unset(TokenSource),
    #[error("{0}: empty")]
    Empty(TokenSource),
    #[error("{0}: longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong(TokenSource),
    #[error("{0}: not a valid HTTP header value (visible ASCII expected)")]
    Invalid(TokenSource),
}

/// The token as sent: a header value marked sensitive (so HTTP/2 never indexes it), whose
/// `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(HeaderValue);

impl Token {
    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// Parses a raw token: trailing whitespace (the newline `echo` and editors leave) is
    /// trimmed, and what is left must be a non-empty header value.
    pub fn parse(raw: &[u8], from: &TokenSource) -> Result<Self, TokenError> {
        let end = raw
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |last| last + 1);
        let trimmed = &raw[..end];
        if trimmed.is_empty() {
            return Err(TokenError::Empty(from.clone()));
        }
        // Stricter than HTTP (which allows obs-text bytes): a token is visible ASCII, and
        // gRPC metadata accepts nothing else.
        if !trimmed.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err(TokenError::Invalid(from.clone()));
        }
        let mut value =
            HeaderValue::from_bytes(trimmed).map_err(|_| TokenError::Invalid(from.clone()))?;
        value.set_sensitive(true);
        Ok(Token(value))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The token header as the client sends it, kept current with its source.
#[derive(Debug)]
pub(crate) struct TokenHeader {
    name: HeaderName,
    from: TokenSource,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The file's bytes as last read, to notice a change without parsing again.
    raw: Vec<u8>,
    /// The last good token.
    token: Token,
    /// Set while the source is unreadable or bad, so the warning is logged once per episode.
    stale: bool,
}

impl TokenHeader {
    /// Reads the token now, so a missing or bad source fails at startup.
    pub(crate) fn load(name: HeaderName, from: TokenSource) -> Result<Self, TokenError> {
        let raw = read(&from)?;
        let token = Token::parse(&raw, &from)?;
        Ok(Self {
            name,
            from,
            state: Mutex::new(State {
                raw,
                token,
                stale: false,
            }),
        })
    }

    pub(crate) fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The token to send now: the file's current contents when they are good, else the last
    /// good token.
    pub(crate) fn current(&self) -> Token {
        let fresh = match &self.from {
            TokenSource::File(_) => Some(read(&self.from)),
            TokenSource::Env(_) => None,
        };
        // A poisoned lock only means another export panicked mid-update; the state itself is
        // always whole (each field is replaced in one assignment), so keep using it.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match fresh {
            None => {}
            Some(Ok(raw)) if raw == state.raw => state.stale = false,
            Some(Ok(raw)) => match Token::parse(&raw, &self.from) {
                Ok(token) => {
                    state.token = token;
                    state.raw = raw;
                    state.stale = false;
                    tracing::info!(source = %self.from, "OTLP token changed; sending the new one");
                }
                Err(error) => warn_once(&mut state, &error),
            },
            Some(Err(error)) => warn_once(&mut state, &error),
        }
        state.token.clone()
    }
}

fn warn_once(state: &mut State, error: &TokenError) {
    if !state.stale {
        state.stale = true;
        tracing::warn!(%error, "OTLP token source unusable; still sending the last good token");
    }
}

fn read(from: &TokenSource) -> Result<Vec<u8>, TokenError> {
    match from {
        TokenSource::File(path) => {
            let read_error = |e: std::io::Error| TokenError::Read {
                from: from.clone(),
                kind: e.kind(),
            };
            let file = std::fs::File::open(path).map_err(read_error)?;
            let mut raw = Vec::new();
            file.take(MAX_TOKEN_BYTES + 1)
                .read_to_end(&mut raw)
                .map_err(read_error)?;
            if raw.len() as u64 > MAX_TOKEN_BYTES {
                return Err(TokenError::TooLong(from.clone()));
            }
            Ok(raw)
        }
        TokenSource::Env(name) => match std::env::var(name) {
            Ok(value) => Ok(value.into_bytes()),
            Err(std::env::VarError::NotPresent) => Err(TokenError::Unset(from.clone())),
            Err(std::env::VarError::NotUnicode(_)) => Err(TokenError::Invalid(from.clone())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> TokenSource {
        TokenSource::File(PathBuf::from(name))
    }

    #[test]
    fn parse_trims_the_trailing_newline() {
        let token = Token::parse(b"abc123\n", &file("/t")).unwrap();
        assert_eq!(token.header_value().as_bytes(), b"abc123");
        assert!(token.header_value().is_sensitive());
        let token = Token::parse(b"abc123\r\n", &file("/t")).unwrap();
        assert_eq!(token.header_value().as_bytes(), b"abc123");
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let token = Token::parse(b"s3cr3t-value", &file("/t")).unwrap();
        for shown in [format!("{token:?}"), format!("{token}")] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
    }

    #[test]
    fn bad_values_name_the_source_not_the_value() {
        let source = file("/var/run/secrets/token");
        for raw in [&b"bad\nSEKRIT"[..], b"caf\xc3\xa9-SEKRIT", b"tab\tSEKRIT"] {
            let error = Token::parse(raw, &source).unwrap_err();
            assert_eq!(error, TokenError::Invalid(source.clone()));
            let text = error.to_string();
            assert!(text.contains("/var/run/secrets/token"), "{text}");
            assert!(!text.contains("SEKRIT"), "{text}");
        }
        let env = TokenSource::Env("LS_TOKEN".into());
        assert_eq!(
            Token::parse(b"\n", &env).unwrap_err().to_string(),
            "token variable LS_TOKEN: empty"
        );
    }

    #[test]
    fn an_unset_variable_is_an_error_naming_it() {
        let error = TokenHeader::load(
            HeaderName::from_static("lightstep-access-token"),
            TokenSource::Env("LTW_OTLP_TEST_SURELY_UNSET".into()),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "token variable LTW_OTLP_TEST_SURELY_UNSET: not set"
        );
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let error = TokenHeader::load(
            HeaderName::from_static("lightstep-access-token"),
            file("/nonexistent/otlp-token"),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "token file /nonexistent/otlp-token: cannot read it (entity not found)"
        );
    }
}
