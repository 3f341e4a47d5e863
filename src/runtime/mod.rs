//! What every long-running command shares, so the next one is written without copying the last:
//!
//! - `args`: the argument groups (telemetry, admin port, TLS) each command flattens into its
//!   own arguments, with the same flags, environment variables and defaults everywhere;
//! - `bootstrap`: the Tokio runtime, telemetry, SIGTERM/SIGINT, and the exit code;
//! - `telemetry`: log lines and OTLP spans; [`metrics`]: the registry with a sub-registry per
//!   component; `admin`: the plain-HTTP port that serves it;
//! - `http1`: HTTP/1.1 connections within limits (accept loop, connection slots, timeouts),
//!   for every port;
//! - [`tls`]: the serving certificate, validated, and swapped when its files change (noticed
//!   by the crate's `reload`).
pub mod admin;
pub(crate) mod args;
pub(crate) mod bootstrap;
pub(crate) mod http1;
pub mod metrics;
pub(crate) mod telemetry;
pub mod tls;
