//! The rolling reload (SIGHUP, `corepool reload`): every running slot gets a replacement
//! process, `reload_batch` at a time; each replacement takes its slot once ready and the old
//! process is stopped. A replacement that fails ends the reload and the old workers keep
//! serving. A request that arrives during a reload is one whole reload more, after it.
//!
//! This type holds the queue and decides; the supervisor starts and stops the processes.

use crate::control::ReloadAnswer;
use std::collections::VecDeque;

#[derive(Debug)]
pub struct Reload {
    /// Slots still to be replaced by the reload under way, if any.
    queue: Option<VecDeque<usize>>,
    /// A reload was asked for while another ran: it follows once that one ends.
    pending: bool,
    batch: usize,
    /// Reloads begun, for the metrics.
    count: u64,
}

impl Reload {
    pub fn new(batch: usize) -> Reload {
        Reload {
            queue: None,
            pending: false,
            batch: batch.max(1),
            count: 0,
        }
    }

    /// Reloads begun so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether a reload is under way.
    pub fn is_running(&self) -> bool {
        self.queue.is_some()
    }

    /// What a request would do now, for the client that asked.
    pub fn answer(&self, stopping: bool) -> ReloadAnswer {
        if stopping {
            ReloadAnswer::Stopping
        } else if self.queue.is_some() {
            ReloadAnswer::Follows
        } else {
            ReloadAnswer::Started
        }
    }

    /// A request: a reload of the `running` slots begins, or one is marked to follow.
    pub fn request(&mut self, running: Vec<usize>) {
        if self.queue.is_some() {
            // The workers this reload already replaced may predate what the request is for
            // (new code deployed in between): a whole reload follows this one. Requests
            // that arrive meanwhile are the same request.
            if !self.pending {
                tracing::info!("a rolling reload is under way; another will follow it");
            }
            self.pending = true;
            return;
        }
        tracing::info!(
            "rolling reload of {} workers, {} at a time",
            running.len(),
            self.batch
        );
        self.count += 1;
        self.queue = Some(running.into());
    }

    /// The next batch of slots to replace, once no replacement is in flight; `running` lists
    /// the running slots, for a reload that was waiting to follow. Empty when none is due.
    pub fn next_batch(&mut self, running: impl FnOnce() -> Vec<usize>) -> Vec<usize> {
        if self.queue.is_none() && std::mem::take(&mut self.pending) {
            self.request(running());
        }
        let Some(queue) = &mut self.queue else {
            return Vec::new();
        };
        if queue.is_empty() {
            self.queue = None;
            tracing::info!("rolling reload complete");
            return Vec::new();
        }
        (0..self.batch).map_while(|_| queue.pop_front()).collect()
    }

    /// A replacement failed: the reload ends, the old workers keep serving.
    pub fn abort(&mut self, why: &str) {
        if self.queue.take().is_some() {
            tracing::error!("rolling reload stopped: {why}; the old workers keep serving");
        } else {
            tracing::warn!("{why}");
        }
    }

    /// The pool stops: no reload runs or follows.
    pub fn cancel(&mut self) {
        self.pending = false;
        if self.queue.take().is_some() {
            tracing::info!("rolling reload cancelled by the stop");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_then_complete() {
        let mut r = Reload::new(2);
        assert_eq!(r.answer(false), ReloadAnswer::Started);
        r.request(vec![0, 1, 2]);
        assert_eq!(r.count(), 1);
        assert_eq!(r.next_batch(Vec::new), vec![0, 1]);
        assert_eq!(r.next_batch(Vec::new), vec![2]);
        assert!(r.is_running());
        assert_eq!(r.next_batch(Vec::new), Vec::<usize>::new());
        assert!(!r.is_running());
    }

    #[test]
    fn a_request_during_a_reload_follows_it_once() {
        let mut r = Reload::new(1);
        r.request(vec![0, 1]);
        assert_eq!(r.answer(false), ReloadAnswer::Follows);
        r.request(vec![0, 1]);
        r.request(vec![0, 1]);
        assert_eq!(r.next_batch(Vec::new), vec![0]);
        assert_eq!(r.next_batch(Vec::new), vec![1]);
        assert_eq!(r.next_batch(Vec::new), Vec::<usize>::new());
        // The follow-up takes the slots running at its start.
        assert_eq!(r.next_batch(|| vec![1]), vec![1]);
        assert_eq!(r.count(), 2);
        assert_eq!(r.next_batch(Vec::new), Vec::<usize>::new());
        assert_eq!(r.next_batch(|| vec![0]), Vec::<usize>::new());
        assert_eq!(r.count(), 2);
    }

    #[test]
    fn abort_and_cancel_end_it() {
        let mut r = Reload::new(1);
        r.request(vec![0, 1]);
        r.abort("boom");
        assert!(!r.is_running());
        r.request(vec![0]);
        r.request(vec![0]);
        r.cancel();
        assert!(!r.is_running());
        assert_eq!(r.next_batch(|| vec![0]), Vec::<usize>::new());
        assert_eq!(r.answer(true), ReloadAnswer::Stopping);
    }
}
