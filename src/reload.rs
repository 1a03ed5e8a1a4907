//! The rolling reload (SIGHUP, `corepool reload`): every running slot gets a replacement
//! process, `reload_batch` at a time; each replacement takes its slot once ready and the old
//! process is stopped. A replacement that fails ends the reload and the old workers keep
//! serving. A request that arrives during a reload is one whole reload more, after it.
//! The reload is complete once the last old workers have exited; a replacement that exits
//! before that, after it took its slot (an app that crashes right after it listens), stops it.
//!
//! This type holds the queue and decides; the supervisor starts and stops the processes.

use crate::control::ReloadAnswer;
use nix::unistd::Pid;
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
    /// The replacements that took their slots in the reload under way.
    took_over: Vec<Pid>,
}

impl Reload {
    pub fn new(batch: usize) -> Reload {
        Reload {
            queue: None,
            pending: false,
            batch: batch.max(1),
            count: 0,
            took_over: Vec::new(),
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
    /// the running slots, for a reload that was waiting to follow; `retiring`: old workers are
    /// still being stopped (the last batch's: the reload completes once they are gone). Empty
    /// when none is due.
    pub fn next_batch(
        &mut self,
        running: impl FnOnce() -> Vec<usize>,
        retiring: bool,
    ) -> Vec<usize> {
        if self.queue.is_none() && std::mem::take(&mut self.pending) {
            self.request(running());
        }
        let Some(queue) = &mut self.queue else {
            return Vec::new();
        };
        if queue.is_empty() {
            if !retiring {
                self.queue = None;
                self.took_over.clear();
                tracing::info!("rolling reload complete");
            }
            return Vec::new();
        }
        (0..self.batch).map_while(|_| queue.pop_front()).collect()
    }

    /// The replacement `pid` took its slot (noted while a reload runs).
    pub fn took_over(&mut self, pid: Pid) {
        if self.queue.is_some() {
            self.took_over.push(pid);
        }
    }

    /// Whether `pid`, a slot's current process that exited, took its slot in the reload under
    /// way.
    pub fn is_new_worker(&self, pid: Pid) -> bool {
        self.queue.is_some() && self.took_over.contains(&pid)
    }

    /// A replacement failed: the reload ends, the old workers keep serving.
    pub fn abort(&mut self, why: &str) {
        self.took_over.clear();
        if self.queue.take().is_some() {
            tracing::error!("rolling reload stopped: {why}; the old workers keep serving");
        } else {
            tracing::warn!("{why}");
        }
    }

    /// The pool stops: no reload runs or follows.
    pub fn cancel(&mut self) {
        self.pending = false;
        self.took_over.clear();
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
        assert_eq!(r.next_batch(Vec::new, false), vec![0, 1]);
        assert_eq!(r.next_batch(Vec::new, false), vec![2]);
        assert!(r.is_running());
        assert_eq!(r.next_batch(Vec::new, false), Vec::<usize>::new());
        assert!(!r.is_running());
    }

    #[test]
    fn a_request_during_a_reload_follows_it_once() {
        let mut r = Reload::new(1);
        r.request(vec![0, 1]);
        assert_eq!(r.answer(false), ReloadAnswer::Follows);
        r.request(vec![0, 1]);
        r.request(vec![0, 1]);
        assert_eq!(r.next_batch(Vec::new, false), vec![0]);
        assert_eq!(r.next_batch(Vec::new, false), vec![1]);
        assert_eq!(r.next_batch(Vec::new, false), Vec::<usize>::new());
        // The follow-up takes the slots running at its start.
        assert_eq!(r.next_batch(|| vec![1], false), vec![1]);
        assert_eq!(r.count(), 2);
        assert_eq!(r.next_batch(Vec::new, false), Vec::<usize>::new());
        assert_eq!(r.next_batch(|| vec![0], false), Vec::<usize>::new());
        assert_eq!(r.count(), 2);
    }

    #[test]
    fn complete_once_the_old_workers_are_gone_and_stopped_by_a_new_one_that_dies() {
        let mut r = Reload::new(1);
        r.request(vec![0]);
        assert_eq!(r.next_batch(Vec::new, false), vec![0]);
        r.took_over(Pid::from_raw(42));
        // The old worker is still being stopped: not complete yet.
        assert_eq!(r.next_batch(Vec::new, true), Vec::<usize>::new());
        assert!(r.is_running());
        assert!(r.is_new_worker(Pid::from_raw(42)));
        assert!(!r.is_new_worker(Pid::from_raw(7)));
        assert_eq!(r.next_batch(Vec::new, false), Vec::<usize>::new());
        assert!(!r.is_running());
        assert!(!r.is_new_worker(Pid::from_raw(42)));
        // A new worker that dies stops the reload.
        r.request(vec![0, 1]);
        assert_eq!(r.next_batch(Vec::new, false), vec![0]);
        r.took_over(Pid::from_raw(43));
        assert!(r.is_new_worker(Pid::from_raw(43)));
        r.abort("died");
        assert!(!r.is_running());
        assert!(!r.is_new_worker(Pid::from_raw(43)));
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
        assert_eq!(r.next_batch(|| vec![0], false), Vec::<usize>::new());
        assert_eq!(r.answer(true), ReloadAnswer::Stopping);
    }
}
