//! Admission: the pod view, the decision, the review boundary, the validating webhook's
//! decision on policies, and the `mutate` preview.
pub mod decide;
mod envelope;
pub mod pod;
pub mod preview;
mod review;
pub mod validate;

pub use decide::Mode;
pub use envelope::{API_VERSION, BadRequest, KIND};
pub use review::*;
