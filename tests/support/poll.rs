//! Waiting without timed assertions: poll a condition until it holds, and fail only after a
//! deadline far above what any step needs, so a loaded two-core machine makes a test slower,
//! never red.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// How long any wait may take before the test fails: far above what any step needs.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Pause between two checks in async tests: short, since the checks are cheap in-process reads.
const ASYNC_INTERVAL: Duration = Duration::from_millis(20);

/// Pause between two checks against a child process: each check is a new HTTPS connection or a
/// file read, so a tenth of a second keeps the poll from competing with the process it waits on.
const BLOCKING_INTERVAL: Duration = Duration::from_millis(100);

/// What a check returns: `true`/`false`, or `Some(value)` once there is something to return.
pub trait Outcome {
    type Value;
    fn done(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn done(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn done(self) -> Option<T> {
        self
    }
}

/// One check against the deadline: its value, or `None` to check again (failing the test, with
/// `log()`, once the deadline has passed).
fn attempt<R: Outcome>(
    what: &str,
    log: &dyn Fn() -> String,
    deadline: Instant,
    outcome: R,
) -> Option<R::Value> {
    let value = outcome.done();
    assert!(
        value.is_some() || Instant::now() < deadline,
        "never: {what}\n{}",
        log()
    );
    value
}

/// Polls `check` until it holds (or returns a value) or [`DEADLINE`] passes.
pub async fn eventually<R: Outcome>(what: &str, mut check: impl AsyncFnMut() -> R) -> R::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = attempt(what, &String::new, deadline, check().await) {
            return value;
        }
        tokio::time::sleep(ASYNC_INTERVAL).await;
    }
}

/// [`eventually`] for tests without a runtime; on failure it also prints `log()` (the child's
/// output, say), which is what tells why the condition never held.
pub fn eventually_blocking<R: Outcome>(
    what: &str,
    log: &dyn Fn() -> String,
    mut check: impl FnMut() -> R,
) -> R::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = attempt(what, log, deadline, check()) {
            return value;
        }
        std::thread::sleep(BLOCKING_INTERVAL);
    }
}

/// [`eventually_blocking`] inside a runtime: a synchronous check (reading a child's state),
/// printing `log()` on failure.
pub async fn eventually_logged<R: Outcome>(
    what: &str,
    log: &dyn Fn() -> String,
    mut check: impl FnMut() -> R,
) -> R::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = attempt(what, log, deadline, check()) {
            return value;
        }
        tokio::time::sleep(BLOCKING_INTERVAL).await;
    }
}
