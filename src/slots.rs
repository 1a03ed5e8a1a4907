//! The pool's slots and the one map that says who a pid is: the current process of slot i, a
//! replacement for it, or an old one retiring. Every change of a process's role goes through
//! the verbs here, so the workers and the map cannot disagree.

use crate::drain::Drains;
use crate::metrics::SlotView;
use crate::os::{Os, Target};
use crate::reaper;
use crate::units::format_duration as human;
use crate::worker::{State, Worker};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Why a slot got a replacement process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Reload,
    Memory,
}

/// Who a pid is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The current process of slot i.
    Current(usize),
    /// A replacement for slot i, not ready yet.
    Replacement(usize, Cause),
    /// An old process of slot i, replaced, being stopped.
    Retiring(usize),
    /// A process of a slot that `corepool scale` (or the CPU follow) removed, being stopped.
    Removed(usize),
}

#[derive(Debug)]
pub struct Slots {
    workers: Vec<Worker>,
    roles: HashMap<Pid, Role>,
}

impl Slots {
    pub fn new(instances: usize, now: Instant) -> Slots {
        Slots {
            workers: (0..instances).map(|slot| Worker::new(slot, now)).collect(),
            roles: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn worker(&self, i: usize) -> &Worker {
        &self.workers[i]
    }

    /// For the verbs that change no process's role (ready, retry, restart, exited...).
    pub fn worker_mut(&mut self, i: usize) -> &mut Worker {
        &mut self.workers[i]
    }

    pub fn role(&self, pid: Pid) -> Option<Role> {
        self.roles.get(&pid).copied()
    }

    /// The processes on their way out, by slot: old ones a reload replaced ("retiring") and
    /// those of slots a scale removed ("removed"), until each has exited.
    pub fn leaving(&self) -> Vec<(usize, Pid, &'static str)> {
        let mut leaving: Vec<(usize, Pid, &'static str)> = self
            .roles
            .iter()
            .filter_map(|(&pid, role)| match *role {
                Role::Retiring(slot) => Some((slot, pid, "retiring")),
                Role::Removed(slot) => Some((slot, pid, "removed")),
                Role::Current(_) | Role::Replacement(..) => None,
            })
            .collect();
        leaving.sort_by_key(|&(slot, pid, _)| (slot, pid.as_raw()));
        leaving
    }

    /// Every live process of the pool: current, replacements, retiring.
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.roles.keys().copied()
    }

    /// How many processes of the pool are alive.
    pub fn live(&self) -> usize {
        self.roles.len()
    }

    /// Slot i started `pid`.
    pub fn started(&mut self, i: usize, pid: Pid, now: Instant, ready: bool) {
        self.workers[i].started(pid, now, ready);
        self.roles.insert(pid, Role::Current(i));
    }

    /// `pid` exited: what it was (it is nobody any more).
    pub fn exited(&mut self, pid: Pid) -> Option<Role> {
        self.roles.remove(&pid)
    }

    /// Slot i got the replacement `pid`.
    pub fn replacing(&mut self, i: usize, pid: Pid, now: Instant, cause: Cause) {
        self.workers[i].replacing(pid, now);
        self.roles.insert(pid, Role::Replacement(i, cause));
    }

    /// Slot i's replacement is ready and takes the slot: returns the old process and how
    /// long the replacement took.
    pub fn promote(&mut self, i: usize, now: Instant) -> Option<(Pid, Duration)> {
        let next = self.workers[i].next()?;
        let old = self.workers[i].promote();
        // The replacement holds the slot now, whether or not an old process was left.
        self.roles.insert(next.pid, Role::Current(i));
        let old = old?;
        self.roles.insert(old, Role::Retiring(i));
        Some((old, now.saturating_duration_since(next.since)))
    }

    /// Slot i's current process died during its replacement: the replacement takes over.
    pub fn take_over(&mut self, i: usize) {
        if let Some(next) = self.workers[i].next() {
            self.workers[i].take_over();
            self.roles.insert(next.pid, Role::Current(i));
        }
    }

    /// Slot i's replacement is being stopped: it retires. Returns it and why it was started.
    pub fn retire_replacement(&mut self, i: usize) -> Option<(Pid, Cause)> {
        let next = self.workers[i].drop_replacement()?;
        let cause = match self.roles.insert(next.pid, Role::Retiring(i)) {
            Some(Role::Replacement(_, cause)) => cause,
            _ => Cause::Reload,
        };
        Some((next.pid, cause))
    }

    /// Adds slots up to `n` in all; each is due to start at `now`.
    pub fn grow(&mut self, n: usize, now: Instant) {
        let from = self.workers.len();
        self.workers
            .extend((from..n).map(|slot| Worker::new(slot, now)));
    }

    /// Removes the highest slot: its processes (current, replacement) become `Removed`.
    /// Returns the slot and those processes.
    pub fn remove_last(&mut self) -> Option<(usize, Vec<Pid>)> {
        let mut worker = self.workers.pop()?;
        let slot = worker.slot();
        let next = worker.drop_replacement().map(|n| n.pid);
        let pids: Vec<Pid> = worker.pid().into_iter().chain(next).collect();
        for &pid in &pids {
            self.roles.insert(pid, Role::Removed(slot));
        }
        Some((slot, pids))
    }

    /// Slot i's replacement exited (its role is already gone).
    pub fn forget_replacement(&mut self, i: usize) {
        self.workers[i].drop_replacement();
    }

    /// The slots that run a process.
    pub fn running(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&i| self.workers[i].is_running())
            .collect()
    }

    /// Worker `i` (pid `pid`) reported ready: says so, with how long it took, the first time.
    pub fn ready(&mut self, i: usize, pid: Pid, now: Instant) {
        if let Some(took) = self.worker_mut(i).ready(now) {
            tracing::info!(
                "worker {} ready (pid {pid}) after {}",
                self.worker(i).slot(),
                human(took)
            );
        }
    }

    /// Forwards signal `sig` (a raw number) to every live worker's group.
    pub fn forward(&self, sig: i32, os: &mut dyn Os) {
        for pid in self.pids() {
            os.signal_raw(Target::Group(pid), sig);
        }
        tracing::debug!(
            "{} forwarded to {} workers",
            reaper::signal_name(sig),
            self.live()
        );
    }

    /// The pool stops: every current worker's group and every replacement's drains, and
    /// each worker is stopping.
    pub fn stop_all(&mut self, drains: &mut Drains, now: Instant, os: &mut dyn Os) {
        for i in 0..self.len() {
            if let Some(pid) = self.worker(i).pid() {
                drains.add(os, Target::Group(pid), Duration::ZERO, now);
            }
            if let Some((pid, _)) = self.retire_replacement(i) {
                drains.add(os, Target::Group(pid), Duration::ZERO, now);
            }
            self.worker_mut(i).stopping();
        }
    }

    /// Restarts the workers not ready `timeout` after their start: their groups drain
    /// (`hint`: why a worker may never have become ready, for the log).
    pub fn restart_unready(
        &mut self,
        drains: &mut Drains,
        timeout: Duration,
        hint: &str,
        now: Instant,
        os: &mut dyn Os,
    ) {
        for i in 0..self.len() {
            if let Some(pid) = self.worker(i).unready_for(timeout, now) {
                tracing::warn!(
                    "worker {} (pid {pid}) not ready after {}: restarting it ({})",
                    self.worker(i).slot(),
                    human(timeout),
                    hint
                );
                drains.add(os, Target::Group(pid), Duration::ZERO, now);
                self.worker_mut(i).restarting();
            }
        }
    }

    /// Whether an old process (replaced, or a replacement given up) is still being stopped.
    pub fn any_retiring(&self) -> bool {
        self.roles.values().any(|r| matches!(r, Role::Retiring(_)))
    }

    pub fn any_replacing(&self) -> bool {
        self.workers.iter().any(|w| w.next().is_some())
    }

    pub fn all_over(&self) -> bool {
        self.workers.iter().all(Worker::is_over)
    }

    /// Whether some slot's process has been ready for at least `uptime`.
    pub fn any_serving_for(&self, uptime: Duration, now: Instant) -> bool {
        self.workers
            .iter()
            .any(|w| w.serving_for(now) >= Some(uptime))
    }

    /// The process groups of ready workers with no replacement under way.
    pub fn settled_groups(&self) -> Vec<i32> {
        self.workers
            .iter()
            .filter(|w| w.is_ready() && w.next().is_none())
            .filter_map(|w| w.pid().map(Pid::as_raw))
            .collect()
    }

    /// Processes spawned and not ready yet: current ones, and replacements.
    pub fn unready(&self) -> usize {
        self.workers
            .iter()
            .map(|w| {
                usize::from(matches!(w.state(), State::Running { ready: false, .. }))
                    + usize::from(w.next().is_some())
            })
            .sum()
    }

    /// Starts due (only when `can_start`: a queued start waits for news, not the clock), and
    /// when each unready process (current or replacement) runs out of `timeout`.
    pub fn deadlines(
        &self,
        timeout: Duration,
        can_start: bool,
    ) -> impl Iterator<Item = Instant> + '_ {
        let starts = self
            .workers
            .iter()
            .filter(move |_| can_start)
            .filter_map(Worker::due);
        let readiness = self.workers.iter().flat_map(move |w| {
            let current = match w.state() {
                State::Running {
                    since,
                    ready: false,
                    ..
                } => Some(since + timeout),
                _ => None,
            };
            current
                .into_iter()
                .chain(w.next().map(|n| n.since + timeout))
        });
        starts.chain(readiness)
    }

    /// The slots as the reporters show them (`ending`: none is ready any more).
    pub fn views(&self, now: Instant, ending: bool) -> Vec<SlotView> {
        self.workers
            .iter()
            .map(|w| {
                let (state, uptime) = match w.state() {
                    // Its time came, but --start-concurrency holds it back.
                    State::Waiting { at } if at <= now && !ending => ("queued", None),
                    State::Waiting { .. } => ("waiting", None),
                    // Spawned, not ready yet (one of --start-concurrency's).
                    State::Running { since, .. } if !w.is_ready() && !ending => {
                        ("starting", Some(now.saturating_duration_since(since)))
                    }
                    State::Running { since, .. } => {
                        ("running", Some(now.saturating_duration_since(since)))
                    }
                    State::Stopping { since, .. } => {
                        ("stopping", Some(now.saturating_duration_since(since)))
                    }
                    State::Done { .. } => ("done", None),
                    State::GivenUp { .. } => ("given-up", None),
                };
                SlotView {
                    slot: w.slot(),
                    pid: w.pid().map(Pid::as_raw),
                    state,
                    ready: w.is_ready() && !ending,
                    restarts: w.restarts(),
                    uptime,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_replacement() {
        let t0 = Instant::now();
        let p = Pid::from_raw;
        let mut s = Slots::new(1, t0);
        s.started(0, p(10), t0, true);
        s.replacing(0, p(11), t0, Cause::Memory);
        assert_eq!(s.live(), 2);
        assert_eq!(s.role(p(11)), Some(Role::Replacement(0, Cause::Memory)));
        assert_eq!(s.promote(0, t0), Some((p(10), Duration::ZERO)));
        assert_eq!(s.role(p(11)), Some(Role::Current(0)));
        assert_eq!(s.role(p(10)), Some(Role::Retiring(0)));
        assert_eq!(s.exited(p(10)), Some(Role::Retiring(0)));
        s.replacing(0, p(12), t0, Cause::Reload);
        assert_eq!(s.retire_replacement(0), Some((p(12), Cause::Reload)));
        assert_eq!(s.role(p(12)), Some(Role::Retiring(0)));
        s.replacing(0, p(13), t0, Cause::Reload);
        s.exited(p(11));
        s.take_over(0);
        assert_eq!(s.role(p(13)), Some(Role::Current(0)));
        assert_eq!(s.worker(0).pid(), Some(p(13)));
        assert!(!s.any_replacing());
    }

    #[test]
    fn removed_slots_keep_their_processes_known() {
        let t0 = Instant::now();
        let p = Pid::from_raw;
        let mut s = Slots::new(2, t0);
        s.started(0, p(10), t0, true);
        s.started(1, p(11), t0, true);
        s.replacing(1, p(12), t0, Cause::Memory);
        s.grow(3, t0);
        assert_eq!(s.len(), 3);
        assert_eq!(s.worker(2).slot(), 2);
        assert_eq!(s.remove_last(), Some((2, vec![])));
        assert_eq!(s.remove_last(), Some((1, vec![p(11), p(12)])));
        assert_eq!(s.len(), 1);
        assert_eq!(s.role(p(11)), Some(Role::Removed(1)));
        assert_eq!(
            s.leaving(),
            [(1, p(11), "removed"), (1, p(12), "removed")],
            "the removed slot's processes are listed until they exit"
        );
        assert_eq!(s.role(p(12)), Some(Role::Removed(1)));
        assert_eq!(s.live(), 3);
        assert_eq!(s.exited(p(12)), Some(Role::Removed(1)));
    }
}
