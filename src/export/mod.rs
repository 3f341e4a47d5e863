//! Export: getting spans out of the process.
//!
//! Today this room holds the OTLP client ([`otlp`]) that carries an OTLP trace request to a
//! collector or to Lightstep. It will also hold the exporter controller (the queue of finished
//! runs, the marker that records what was sent, and the backfill), which feeds run spans to
//! that client.

pub mod otlp;
