//! Admission: the pod view, the decision, the review boundary, and the `mutate` preview.
pub mod decide;
pub mod pod;
pub mod preview;
mod review;

pub use decide::Mode;
pub use review::*;
