//! The export queue: runs due for export, each at most once, bounded by a capacity that counts
//! runs waiting, backing off and in flight alike.
//!
//! A run that does not fit is not remembered here: it is still in the watch cache, unmarked,
//! and the controller's periodic rescan offers it again once there is room. So a backend that
//! is down for an hour costs a full queue and a growing lag, never more memory, and loses no
//! run that still exists.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use tokio::time::Instant;

use crate::cluster::runs::RunKey;

/// What is left to do for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Build its spans and send them.
    Export,
    /// The backend accepted the spans; only the annotations are left to write (never resend).
    Mark(Vec<(String, String)>),
}

/// A queued run's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub stage: Stage,
    /// Failed attempts so far, for the backoff.
    pub failures: u32,
    /// Of those, the permanent ones (the backend refused the request itself, or the policy's
    /// exporter could not be built): at `--max-rejections` the run is given up on.
    pub rejections: u32,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Queue {
    capacity: usize,
    ready: VecDeque<RunKey>,
    delayed: BinaryHeap<Reverse<(Instant, RunKey)>>,
    /// Every run in the queue or in flight, and its state (`None` while in flight).
    items: HashMap<RunKey, Option<Item>>,
    in_flight: usize,
}

impl Queue {
    pub fn new(capacity: usize) -> Queue {
        Queue {
            capacity: capacity.max(1),
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            items: HashMap::new(),
            in_flight: 0,
        }
    }

    /// Queues `key` for export unless it is already queued or in flight. `false` when the queue
    /// is full (the rescan offers it again later).
    pub fn push(&mut self, key: RunKey) -> bool {
        if self.items.contains_key(&key) {
            return true;
        }
        if self.items.len() >= self.capacity {
            return false;
        }
        self.items.insert(
            key.clone(),
            Some(Item {
                stage: Stage::Export,
                failures: 0,
                rejections: 0,
            }),
        );
        self.ready.push_back(key);
        true
    }

    /// Whether `key` is queued or in flight.
    pub fn contains(&self, key: &RunKey) -> bool {
        self.items.contains_key(key)
    }

    /// Whether `key` is in flight.
    pub fn in_flight(&self, key: &RunKey) -> bool {
        matches!(self.items.get(key), Some(None))
    }

    /// Whether the backend has `key`'s spans or may have them now: in flight, or accepted and
    /// waiting for its mark.
    pub fn exporting(&self, key: &RunKey) -> bool {
        match self.items.get(key) {
            Some(None) => true,
            Some(Some(item)) => matches!(item.stage, Stage::Mark(_)),
            None => false,
        }
    }

    /// The next run whose time has come, now in flight; finish it with [`Queue::done`] or
    /// [`Queue::retry_at`].
    pub fn pop(&mut self, now: Instant) -> Option<(RunKey, Item)> {
        while let Some(Reverse((at, _))) = self.delayed.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, key))) = self.delayed.pop() {
                self.ready.push_back(key);
            }
        }
        while let Some(key) = self.ready.pop_front() {
            // An entry cleared while it waited has no state left: skip it.
            if let Some(slot) = self.items.get_mut(&key)
                && let Some(item) = slot.take()
            {
                self.in_flight += 1;
                return Some((key, item));
            }
        }
        None
    }

    /// Puts an in-flight run back, to be tried again at `at`.
    pub fn retry_at(&mut self, key: RunKey, item: Item, at: Instant) {
        if let Some(None) = self.items.insert(key.clone(), Some(item)) {
            self.in_flight -= 1;
        }
        self.delayed.push(Reverse((at, key)));
    }

    /// The run is finished with (exported, skipped, or no longer due).
    pub fn done(&mut self, key: &RunKey) {
        if let Some(None) = self.items.remove(key) {
            self.in_flight -= 1;
        }
    }

    /// When the earliest backing-off run is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse((at, _))| *at)
    }

    /// Runs queued (ready or backing off), not in flight.
    pub fn depth(&self) -> usize {
        self.items.len() - self.in_flight
    }

    /// Runs queued or in flight.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Forgets every queued run (leadership was lost: the next leader rescans); runs in
    /// flight finish.
    pub fn clear(&mut self) {
        self.items.retain(|_, item| item.is_none());
        self.ready.clear();
        self.delayed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::runs::RunKind;
    use std::time::Duration;

    fn key(name: &str) -> RunKey {
        RunKey {
            kind: RunKind::PipelineRun,
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_full_queue_refuses_and_counts_runs_in_flight() {
        let now = Instant::now();
        let mut q = Queue::new(2);
        assert!(q.push(key("a")));
        assert!(q.push(key("a")), "a duplicate is already queued");
        assert!(q.push(key("b")));
        assert!(!q.push(key("c")));
        let (a, _) = q.pop(now).unwrap();
        assert_eq!(a, key("a"));
        assert_eq!((q.depth(), q.len()), (1, 2));
        assert!(!q.push(key("c")), "in flight still takes room");
        q.done(&a);
        assert!(q.push(key("c")));
    }

    #[test]
    fn a_retried_run_waits_for_its_time() {
        let now = Instant::now();
        let mut q = Queue::new(4);
        q.push(key("a"));
        let (a, mut item) = q.pop(now).unwrap();
        item.failures += 1;
        q.retry_at(a, item, now + Duration::from_secs(5));
        assert!(q.push(key("a")), "still queued: not twice");
        assert!(q.pop(now).is_none());
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(5)));
        let (_, item) = q.pop(now + Duration::from_secs(5)).unwrap();
        assert_eq!(item.failures, 1);
    }

    #[test]
    fn clearing_keeps_runs_in_flight() {
        let now = Instant::now();
        let mut q = Queue::new(4);
        q.push(key("a"));
        q.push(key("b"));
        let (a, _) = q.pop(now).unwrap();
        q.clear();
        assert!(q.pop(now).is_none());
        assert!(q.contains(&a));
        assert!(!q.contains(&key("b")));
    }
}
