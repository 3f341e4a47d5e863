//! The loop's heartbeat, for `/healthz`: the loop beats on every turn, and it turns at least
//! once a `--rescan-interval` (its rescan timer), so a beat older than a few intervals means
//! the loop is wedged (stuck in a call that never returns) and the pod should be restarted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many rescan intervals may pass without a beat: the timer's tick plus a turn's work,
/// with room for a slow node.
const MISSED_TURNS: u32 = 3;

/// The shortest bound: a short `--rescan-interval` (tests use 2 s) must not make a busy but
/// healthy turn look wedged.
const MIN_BOUND: Duration = Duration::from_secs(60);

/// See the module documentation; cheap to clone.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    last: Arc<Mutex<Instant>>,
    bound: Duration,
}

impl Heartbeat {
    /// A heartbeat that beat now, for a loop that turns at least once a `rescan_interval`.
    pub fn new(rescan_interval: Duration) -> Heartbeat {
        Heartbeat {
            last: Arc::new(Mutex::new(Instant::now())),
            bound: rescan_interval.saturating_mul(MISSED_TURNS).max(MIN_BOUND),
        }
    }

    pub fn beat(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Whether the loop beat within the bound before `now`.
    pub fn alive_at(&self, now: Instant) -> bool {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        now.saturating_duration_since(last) <= self.bound
    }

    pub fn alive(&self) -> bool {
        self.alive_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stopped_beating_is_not_alive_after_the_bound() {
        let heartbeat = Heartbeat::new(Duration::from_secs(30));
        let now = Instant::now();
        assert!(heartbeat.alive_at(now));
        assert!(heartbeat.alive_at(now + Duration::from_secs(89)));
        assert!(!heartbeat.alive_at(now + Duration::from_secs(91)));
        // A short interval still gets the floor.
        let short = Heartbeat::new(Duration::from_secs(2));
        assert!(short.alive_at(now + Duration::from_secs(59)));
        assert!(!short.alive_at(now + Duration::from_secs(61)));
    }

    #[test]
    fn a_beat_renews_it() {
        let heartbeat = Heartbeat::new(Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
        let before = Instant::now();
        heartbeat.beat();
        assert!(heartbeat.alive_at(before + Duration::from_secs(90)));
    }
}
