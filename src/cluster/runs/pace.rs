//! The pace of writes on runs (`--mark-qps`): at most so many a second across every clone of
//! the [`super::Marker`], and a pause for all of them when the API server answers 429.
//!
//! Trade-off: the API server's `Retry-After` is not read (kube's error carries the status, not
//! the headers); a 429 pauses every write for [`THROTTLED_PAUSE`] and the write itself is
//! retried with the caller's backoff.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

/// How long every write waits after a 429: the API server's priority and fairness queues
/// drain in about a second.
pub const THROTTLED_PAUSE: Duration = Duration::from_secs(1);

/// A shared next-allowed time; cheap to clone.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Between two writes; zero: no limit but the pause after a 429.
    interval: Duration,
    next: Arc<Mutex<Instant>>,
}

impl Pace {
    /// At most `qps` writes a second; 0 for no limit.
    pub fn new(qps: f64) -> Pace {
        let interval = match qps > 0.0 {
            true => Duration::from_secs_f64(1.0 / qps),
            false => Duration::ZERO,
        };
        Pace {
            interval,
            next: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Waits for this write's turn (and takes it).
    pub async fn turn(&self) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        // A turn that is due now goes at once (a timer would round it up to the next tick).
        if at > Instant::now() {
            sleep_until(at).await;
        }
    }

    /// The API server said 429: no write for [`THROTTLED_PAUSE`].
    pub fn throttled(&self) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        *next = (*next).max(Instant::now() + THROTTLED_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_spaced_at_the_rate_and_paused_after_a_429() {
        let pace = Pace::new(20.0);
        let start = Instant::now();
        for _ in 0..5 {
            pace.clone().turn().await;
        }
        // The first at once, then one every 50 ms (never sooner; a loaded machine may be later).
        assert!(start.elapsed() >= Duration::from_millis(200));
        pace.throttled();
        let before = Instant::now();
        pace.turn().await;
        assert!(before.elapsed() >= THROTTLED_PAUSE - Duration::from_millis(60));
    }

    #[tokio::test]
    async fn no_rate_means_no_wait_but_a_429_still_pauses() {
        let pace = Pace::new(0.0);
        let start = Instant::now();
        for _ in 0..1000 {
            pace.turn().await;
        }
        assert!(start.elapsed() < THROTTLED_PAUSE);
        pace.throttled();
        let before = Instant::now();
        pace.turn().await;
        assert!(before.elapsed() >= THROTTLED_PAUSE - Duration::from_millis(10));
    }
}
