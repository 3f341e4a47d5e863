//! The trace contract: how a Tekton run's ids are chosen, written once for every component.
//!
//! Pure: no I/O, no clock, no async.
pub mod tekton;
mod w3c;

pub use w3c::*;
