//! Replacements: a slot gets a new process that takes its place once ready, the old one is
//! stopped. Two concerns ask for them, each with its own queue and words: the rolling reload
//! ([`Reload`]) and the memory watch ([`MemoryWatch`]); the reload goes first, and a slot it
//! replaces anyway leaves the memory queue. One batch is in flight at a time.

use crate::control::ReloadAnswer;
use crate::drain::Drains;
use crate::memory::MemoryWatch;
use crate::os::{Os, Target};
use crate::reload::Reload;
use crate::slots::{Cause, Slots};
use crate::units::format_duration as human;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Replacements {
    reload: Reload,
    memory: MemoryWatch,
    batch: usize,
    /// Time between routing away from a replaced worker and signalling it (proxy mode).
    handoff: Duration,
    /// A worker must report readiness (else a replacement is ready once started).
    needs_ready: bool,
}

impl Replacements {
    pub fn new(
        batch: usize,
        max_memory: Option<u64>,
        handoff: Duration,
        needs_ready: bool,
        now: Instant,
    ) -> Replacements {
        Replacements {
            reload: Reload::new(batch),
            memory: MemoryWatch::new(max_memory, now),
            batch: batch.max(1),
            handoff,
            needs_ready,
        }
    }

    /// What a reload request does now, for the client that asked.
    pub fn answer(&self, stopping: bool) -> ReloadAnswer {
        self.reload.answer(stopping)
    }

    /// A reload request: every running slot is to be replaced.
    pub fn request_reload(&mut self, slots: &Slots) {
        self.reload.request(slots.running());
    }

    /// Whether a rolling reload is under way (a scale waits for it).
    pub fn reloading(&self) -> bool {
        self.reload.is_running()
    }

    /// The pool stops: no reload runs or follows.
    pub fn cancel(&mut self) {
        self.reload.cancel();
    }

    /// Reloads begun and memory replacements decided.
    pub fn counters(&self) -> (u64, u64) {
        (self.reload.count(), self.memory.restarts())
    }

    /// Every check interval, hands the memory watch each settled worker's group RSS.
    pub fn check_memory(&mut self, slots: &Slots, now: Instant, os: &mut dyn Os) {
        if !self.memory.due(now) {
            return;
        }
        let usage = os.usage(&slots.settled_groups());
        let rss: Vec<(usize, Option<u64>)> = (0..slots.len())
            .map(|i| {
                let w = slots.worker(i);
                let bytes = w.pid().and_then(|p| usage.get(&p.as_raw()));
                (w.slot(), bytes.map(|u| u.rss_bytes))
            })
            .collect();
        self.memory.check(now, &rss);
    }

    /// Starts the next batch (the reload's, else the memory watch's) once none is in flight.
    pub fn advance(
        &mut self,
        slots: &mut Slots,
        drains: &mut Drains,
        now: Instant,
        os: &mut dyn Os,
    ) {
        if slots.any_replacing() {
            return;
        }
        let running = slots.running();
        let mut batch = self.reload.next_batch(|| running, slots.any_retiring());
        if batch.is_empty() && self.reload.is_running() {
            // The reload's last old workers are still being stopped.
            return;
        }
        let cause = if batch.is_empty() {
            batch = (0..self.batch)
                .map_while(|_| self.memory.take_next())
                .collect();
            Cause::Memory
        } else {
            for &i in &batch {
                self.memory.covered(i);
            }
            Cause::Reload
        };
        for i in batch {
            // A slot that is restarting anyway gets new code by itself; one a scale removed
            // is gone.
            if i >= slots.len() || !slots.worker(i).is_running() {
                continue;
            }
            let slot = slots.worker(i).slot();
            match os.spawn(slot, slots.len()) {
                Ok(pid) => {
                    tracing::info!("worker {slot}: replacement started, pid {pid}");
                    slots.replacing(i, pid, now, cause);
                    if !self.needs_ready {
                        os.route_ready(pid);
                        self.promote(slots, drains, i, pid, now, os);
                    }
                }
                Err(err) => {
                    self.failed(
                        cause,
                        &format!("cannot start a replacement for worker {slot}: {err}"),
                    );
                    return;
                }
            }
        }
    }

    /// The replacement `pid` of slot i is ready: it takes the slot; the old one is stopped.
    pub fn promote(
        &mut self,
        slots: &mut Slots,
        drains: &mut Drains,
        i: usize,
        pid: Pid,
        now: Instant,
        os: &mut dyn Os,
    ) {
        let Some((old, took)) = slots.promote(i, now) else {
            return;
        };
        self.reload.took_over(pid);
        tracing::info!(
            "worker {}: replacement pid {pid} ready after {}; stopping old pid {old}",
            slots.worker(i).slot(),
            human(took)
        );
        // In proxy mode the relay may have just connected to the old worker: stop routing to
        // it now, signal it a moment later, so that what already sits in its accept queue is
        // accepted before it closes its listener.
        drains.add(os, Target::Group(old), self.handoff, now);
    }

    /// Stops replacements that were not ready within `timeout`; the old workers keep serving.
    pub fn check_timeouts(
        &mut self,
        slots: &mut Slots,
        drains: &mut Drains,
        timeout: Duration,
        now: Instant,
        os: &mut dyn Os,
    ) {
        for i in 0..slots.len() {
            let Some(next) = slots.worker(i).next() else {
                continue;
            };
            if now.saturating_duration_since(next.since) < timeout {
                continue;
            }
            let Some((pid, cause)) = slots.retire_replacement(i) else {
                continue;
            };
            drains.add(os, Target::Group(pid), Duration::ZERO, now);
            self.failed(
                cause,
                &format!(
                    "the replacement of worker {} (pid {pid}) was not ready after {}",
                    slots.worker(i).slot(),
                    human(timeout)
                ),
            );
        }
    }

    /// A slot's current process exited: if it took its slot in the reload under way, the new
    /// code does not hold, and the reload stops (the slot restarts as after any exit).
    pub fn current_exited(&mut self, pid: Pid, slot: usize, status: &dyn std::fmt::Display) {
        if self.reload.is_new_worker(pid) {
            self.reload.abort(&format!(
                "the replacement of worker {slot} (pid {pid}) exited after it took over: \
                 {status}"
            ));
        }
    }

    /// Replacement `i` (pid `pid`, for `cause`) exited before it was ready: its slot forgets it
    /// and what it was for fails. The slot's number.
    pub fn replacement_exited(
        &mut self,
        slots: &mut Slots,
        i: usize,
        cause: Cause,
        pid: Pid,
        status: &dyn std::fmt::Display,
    ) -> usize {
        let slot = slots.worker(i).slot();
        slots.forget_replacement(i);
        self.failed(
            cause,
            &format!(
                "the replacement of worker {slot} (pid {pid}) exited before it was \
                 ready: {status}"
            ),
        );
        slot
    }

    /// A replacement failed: its concern says so in its own words.
    pub fn failed(&mut self, cause: Cause, why: &str) {
        match cause {
            Cause::Reload => self.reload.abort(why),
            Cause::Memory => self.memory.failed(why),
        }
    }
}
