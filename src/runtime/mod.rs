//! What every long-running command shares: telemetry, TLS and file reloads.
pub mod reload;
pub mod telemetry;
pub mod tls;
