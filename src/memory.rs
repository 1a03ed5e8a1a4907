//! The memory watch (`--max-memory`): every check interval the supervisor hands in each ready
//! worker's process-group RSS; a slot above the limit for `MEMORY_STRIKES` checks in a row is
//! queued for a graceful replacement (a new process first, the old one stopped once the new
//! one is ready), as a reload does for one slot. Its queue and its log lines are its own.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How often worker memory is compared with --max-memory.
pub const MEMORY_CHECK: Duration = Duration::from_secs(2);
/// Consecutive checks above --max-memory before a worker is replaced.
pub const MEMORY_STRIKES: u32 = 3;

#[derive(Debug)]
pub struct MemoryWatch {
    /// --max-memory in bytes; None: no watch.
    limit: Option<u64>,
    /// Consecutive checks each slot spent above the limit.
    strikes: HashMap<usize, u32>,
    checked: Instant,
    /// Slots to replace, in order.
    queue: VecDeque<usize>,
    /// Replacements decided, for the metrics.
    restarts: u64,
}

impl MemoryWatch {
    pub fn new(limit: Option<u64>, now: Instant) -> MemoryWatch {
        MemoryWatch {
            limit,
            strikes: HashMap::new(),
            checked: now,
            queue: VecDeque::new(),
            restarts: 0,
        }
    }

    /// Whether a check is due at `now` (and a limit is set).
    pub fn due(&self, now: Instant) -> bool {
        self.limit.is_some() && now.saturating_duration_since(self.checked) >= MEMORY_CHECK
    }

    /// One check: `rss` gives each slot's resident bytes (None: not measured, not ready).
    pub fn check(&mut self, now: Instant, rss: &[(usize, Option<u64>)]) {
        let Some(limit) = self.limit else {
            return;
        };
        self.checked = now;
        for &(slot, bytes) in rss {
            let Some(bytes) = bytes.filter(|&b| b > limit) else {
                self.strikes.remove(&slot);
                continue;
            };
            let strikes = self.strikes.entry(slot).or_insert(0);
            *strikes += 1;
            if *strikes < MEMORY_STRIKES {
                continue;
            }
            self.strikes.remove(&slot);
            if !self.queue.contains(&slot) {
                tracing::warn!(
                    "worker {slot}: {} MiB resident, above --max-memory {} MiB for {} checks: \
                     replacing it",
                    bytes >> 20,
                    limit >> 20,
                    MEMORY_STRIKES
                );
                self.queue.push_back(slot);
                self.restarts += 1;
            }
        }
    }

    /// The next slot to replace.
    pub fn take_next(&mut self) -> Option<usize> {
        self.queue.pop_front()
    }

    /// A reload replaces `slot` anyway.
    pub fn covered(&mut self, slot: usize) {
        self.queue.retain(|&s| s != slot);
    }

    /// The memory replacement of `slot` failed: the old worker keeps serving (and is
    /// measured again).
    pub fn failed(&mut self, why: &str) {
        tracing::error!("memory replacement stopped: {why}; the old worker keeps serving");
    }

    /// Replacements decided so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The next check, if a limit is set.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.limit.map(|_| self.checked + MEMORY_CHECK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn three_strikes_in_a_row_queue_a_slot_once() {
        let t0 = Instant::now();
        let mut m = MemoryWatch::new(Some(100 * MIB), t0);
        assert!(!m.due(t0));
        let at = |n: u32| t0 + MEMORY_CHECK * n;
        assert!(m.due(at(1)));
        m.check(at(1), &[(0, Some(150 * MIB)), (1, Some(150 * MIB))]);
        m.check(at(2), &[(0, Some(150 * MIB)), (1, Some(50 * MIB))]);
        m.check(at(3), &[(0, Some(150 * MIB)), (1, Some(150 * MIB))]);
        assert!(!m.due(at(3)));
        assert_eq!(m.restarts(), 1);
        assert_eq!(m.take_next(), Some(0));
        assert_eq!(m.take_next(), None);
        assert_eq!(m.next_deadline(), Some(at(4)));
    }

    #[test]
    fn no_limit_no_watch() {
        let t0 = Instant::now();
        let mut m = MemoryWatch::new(None, t0);
        assert!(!m.due(t0 + MEMORY_CHECK * 10));
        m.check(t0, &[(0, Some(u64::MAX))]);
        assert_eq!((m.take_next(), m.next_deadline()), (None, None));
    }

    #[test]
    fn a_reload_covers_a_queued_slot() {
        let t0 = Instant::now();
        let mut m = MemoryWatch::new(Some(MIB), t0);
        for n in 1..=3 {
            m.check(t0 + MEMORY_CHECK * n, &[(2, Some(2 * MIB))]);
        }
        m.covered(2);
        assert_eq!(m.take_next(), None);
        assert_eq!(m.restarts(), 1);
    }
}
