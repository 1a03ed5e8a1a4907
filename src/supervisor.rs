//! The supervision core: the slots, who each pid is, and every decision the pool takes about
//! them, with no process, clock or socket of its own.
//!
//! Everything the core does to the world goes through [`Os`] (spawn, signal, liveness,
//! children, usage, routing), and every call is given the time: so the unit tests drive it
//! with `FakeOs` and a fake clock. The concerns live in their own types: [`Reload`] (the
//! rolling reload), [`MemoryWatch`] (--max-memory), [`Drains`] (the stop signal and SIGKILL
//! escalation) and [`Shutdown`] (the shutdown delay, the stop and the exit code); this module
//! ties them to the slots. One map answers "who is this pid": the current process of a slot,
//! a replacement for it, or an old one retiring.

use crate::drain::Drains;
use crate::ending::{Ending, Shutdown, StopStep, pool_death_code};
use crate::exit;
use crate::memory::MemoryWatch;
use crate::metrics::SlotView;
use crate::os::{Os, Target};
use crate::reaper::{self, Exit, ExitStatus};
use crate::reload::Reload;
use crate::reserve;
use crate::signals::Action;
use crate::units::format_duration as human;
use crate::worker::{AfterExit, RestartRules, State, Worker};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often liveness of draining groups is checked while a drain is under way.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// A start that failed for corepool's own lack of resources is tried again after this long.
const RESOURCE_RETRY: Duration = Duration::from_secs(1);

/// What the core needs from the configuration and the balance mode.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rules: RestartRules,
    pub instances: usize,
    pub ready_timeout: Duration,
    pub reload_batch: usize,
    pub stop_signal: Signal,
    pub kill_timeout: Duration,
    pub shutdown_delay: Duration,
    pub max_memory: Option<u64>,
    /// A worker must report readiness (else it is ready once started).
    pub needs_ready: bool,
    /// Time between routing away from a replaced worker and signalling it (proxy mode).
    pub handoff: Duration,
    /// Why a worker may never have become ready, for the log line that restarts it.
    pub not_ready_hint: &'static str,
    /// The program, for messages.
    pub program: String,
}

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
}

/// The core's whole state.
#[derive(Debug)]
pub struct Supervisor {
    s: Settings,
    workers: Vec<Worker>,
    roles: HashMap<Pid, Role>,
    reload: Reload,
    memory: MemoryWatch,
    drains: Drains,
    shutdown: Shutdown,
    /// Some worker process has been started: from then on a start that fails is a crash of
    /// that slot (restarted with backoff); before, it is the command that cannot run at all.
    launched_once: bool,
    /// When the pool started, for `--fail-fast`.
    started_at: Instant,
    /// Some worker has served: been ready for `--min-uptime`. Until then `--fail-fast` holds.
    served: bool,
}

impl Supervisor {
    pub fn new(s: Settings, now: Instant) -> Supervisor {
        Supervisor {
            workers: (0..s.instances)
                .map(|slot| Worker::new(slot, now))
                .collect(),
            roles: HashMap::new(),
            reload: Reload::new(s.reload_batch),
            memory: MemoryWatch::new(s.max_memory, now),
            drains: Drains::new(s.stop_signal, s.kill_timeout),
            shutdown: Shutdown::new(s.shutdown_delay),
            launched_once: false,
            started_at: now,
            served: false,
            s,
        }
    }

    /// What is due at `now`: starts, readiness timeouts, the memory check, the reload's next
    /// batch, the end of the shutdown delay, drain escalation.
    pub fn step(&mut self, now: Instant, os: &mut dyn Os) {
        self.start_due(now, os);
        self.check_readiness(now, os);
        self.check_memory(now, os);
        self.advance_replacements(now, os);
        if let Some(sig) = self.shutdown.delay_over(now) {
            tracing::info!(
                "shutdown delay over: stopping {} workers with {}, kill timeout {}",
                self.live_workers(),
                self.s.stop_signal,
                human(self.s.kill_timeout)
            );
            self.begin_stop(Ending::Stop(sig), now, os);
        }
        self.drains.escalate(os, now, self.shutdown.is_ending());
    }

    fn start_due(&mut self, now: Instant, os: &mut dyn Os) {
        for i in 0..self.workers.len() {
            if !self.shutdown.is_ending() && self.workers[i].due().is_some_and(|at| at <= now) {
                self.start(i, now, os);
            }
        }
    }

    fn start(&mut self, i: usize, now: Instant, os: &mut dyn Os) {
        let slot = self.workers[i].slot();
        let err = match os.spawn(slot, self.workers.len()) {
            Ok(pid) => {
                self.launched_once = true;
                self.workers[i].started(pid, now, !self.s.needs_ready);
                self.roles.insert(pid, Role::Current(i));
                tracing::info!("worker {slot} started, pid {pid}");
                return;
            }
            Err(err) => err,
        };
        let program = &self.s.program;
        let code = match (err.kind(), err.raw_os_error()) {
            (std::io::ErrorKind::NotFound, _) => exit::NOT_FOUND,
            (std::io::ErrorKind::PermissionDenied, _) => exit::NOT_EXECUTABLE,
            (_, Some(libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY)) => exit::NOT_EXECUTABLE,
            // fork or pipe failures (EAGAIN, EMFILE): corepool's own trouble.
            _ => exit::STARTUP,
        };
        if !self.launched_once {
            // The file exists and is executable (checked before), so ENOENT from execve
            // means what it names to run it is missing.
            let hint = match err.raw_os_error() {
                Some(libc::ENOENT) => " (its #! interpreter or ELF loader does not exist)",
                Some(libc::ENOEXEC) => " (neither a binary for this machine nor a #! script)",
                _ => "",
            };
            tracing::error!("cannot run {program}: {err}{hint}");
            self.begin_stop(Ending::PoolDied(code), now, os);
            return;
        }
        if reserve::is_resource_shortage(&err) {
            // corepool's trouble, not the program's: not a crash of the slot.
            tracing::error!(
                "worker {slot}: cannot start {program}: {err} (corepool is short of \
                 resources; not counted as a failure of the worker): retrying in {}",
                human(RESOURCE_RETRY)
            );
            self.workers[i].retry_at(now + RESOURCE_RETRY);
            return;
        }
        // It started before: it vanished or became unusable since.
        tracing::error!("worker {slot}: cannot start {program}: {err}");
        self.after_exit(i, ExitStatus::Code(code), now, true, os);
    }

    /// Applies one reaped exit: a worker's, a replacement's, a retiring one's, or an orphan's.
    pub fn on_exit(&mut self, exit: Exit, now: Instant, os: &mut dyn Os) {
        os.route_exited(exit.pid);
        let (pid, status) = (exit.pid, exit.status);
        let i = match self.roles.remove(&pid) {
            None => {
                tracing::debug!("reaped orphan pid {pid} ({status})");
                return;
            }
            Some(Role::Retiring(slot)) => {
                tracing::info!(
                    "old worker {slot} (pid {pid}) exited after its replacement: {status}"
                );
                return;
            }
            Some(Role::Replacement(i, cause)) => {
                let slot = self.workers[i].slot();
                self.workers[i].drop_replacement();
                self.replacement_failed(
                    cause,
                    &format!(
                        "the replacement of worker {slot} (pid {pid}) exited before it was \
                         ready: {status}"
                    ),
                );
                self.drain_leftovers(slot, pid, now, os);
                return;
            }
            Some(Role::Current(i)) => i,
        };
        let slot = self.workers[i].slot();
        if let Some(next) = self.workers[i].next()
            && !self.shutdown.is_ending()
        {
            // The old process died during its reload: the replacement takes over at once.
            tracing::warn!(
                "worker {slot} (pid {pid}) exited during its reload: {status}; its replacement \
                 takes over"
            );
            self.workers[i].take_over();
            self.roles.insert(next.pid, Role::Current(i));
            self.drain_leftovers(slot, pid, now, os);
            return;
        }
        let was_stopping = matches!(self.workers[i].state(), State::Stopping { .. });
        if was_stopping || self.shutdown.is_ending() {
            tracing::info!("worker {slot} (pid {pid}) exited: {status}");
        } else {
            tracing::warn!("worker {slot} (pid {pid}) exited: {status}");
            self.drain_leftovers(slot, pid, now, os);
        }
        self.after_exit(i, status, now, false, os);
    }

    /// Whatever a dead leader left behind in its group must not linger (it may hold the port
    /// or a lock): it gets the stop signal and the kill timeout, like a stop.
    fn drain_leftovers(&mut self, slot: usize, leader: Pid, now: Instant, os: &mut dyn Os) {
        let group = Target::Group(leader);
        if os.alive(group) {
            tracing::info!("worker {slot}: stopping what is left of process group {leader}");
            self.drain(group, Duration::ZERO, now, os);
        }
    }

    /// The slot's run ended (or its start failed): restart, finish or give up, and end the
    /// pool when no slot is left.
    fn after_exit(
        &mut self,
        i: usize,
        status: ExitStatus,
        now: Instant,
        start_failed: bool,
        os: &mut dyn Os,
    ) {
        let rules = self.s.rules;
        let stopping = self.shutdown.is_ending();
        self.served |= self.workers[i].serving_for(now) >= Some(rules.min_uptime);
        let fail_fast = !self.served
            && !rules.fail_fast.is_zero()
            && now.saturating_duration_since(self.started_at) >= rules.fail_fast;
        let worker = &mut self.workers[i];
        let after = if start_failed {
            worker.start_failed(status, now, &rules, stopping, fail_fast)
        } else {
            worker.exited(status, now, &rules, stopping, fail_fast)
        };
        let (slot, failures) = (worker.slot(), worker.failures());
        match after {
            AfterExit::RestartAt(at) => tracing::info!(
                "worker {slot} restarts in {} (restart {}, {failures} short-lived exits in a row)",
                human(at.saturating_duration_since(now)),
                worker.restarts(),
            ),
            AfterExit::GaveUp => {
                if rules.max_restarts > 0 && failures >= rules.max_restarts {
                    tracing::error!(
                        "worker {slot} given up after {failures} failed runs in a row (each \
                         exited within {} of its start, or before it was ready)",
                        human(rules.min_uptime)
                    );
                } else {
                    tracing::error!(
                        "worker {slot} given up ({status}): no worker has served in the {} \
                         since start (--fail-fast), and it failed {failures} times in a row",
                        human(rules.fail_fast),
                    );
                }
                os.abandon(slot);
            }
            AfterExit::Finished => {}
        }
        if !self.shutdown.is_ending() && self.workers.iter().all(Worker::is_over) {
            let code = pool_death_code(status, rules.policy);
            tracing::error!("every worker slot is finished: the pool is dead (exit {code})");
            self.begin_stop(Ending::PoolDied(code), now, os);
        }
    }

    /// A signal the signal stream decided on.
    pub fn on_signal(&mut self, action: Action, now: Instant, os: &mut dyn Os) {
        match action {
            Action::Reap => {}
            Action::Stop(sig) => match self.shutdown.on_stop_signal(sig, now) {
                StopStep::Delay(delay) => tracing::info!(
                    "SIGTERM: not ready any more (/readyz fails); workers keep serving for the \
                     shutdown delay of {}, then stop",
                    human(delay)
                ),
                StopStep::Hurry => tracing::info!("{sig} during the shutdown delay: stopping now"),
                StopStep::Begin => {
                    tracing::info!(
                        "{sig}: stopping {} workers with {}, kill timeout {}",
                        self.live_workers(),
                        self.s.stop_signal,
                        human(self.s.kill_timeout)
                    );
                    self.begin_stop(Ending::Stop(sig), now, os);
                }
                StopStep::KillNow => {
                    tracing::warn!("{sig} again: killing every remaining process group now");
                    self.drains.hurry(now);
                }
            },
            Action::Forward(sig) => {
                for &pid in self.roles.keys() {
                    os.signal_raw(Target::Group(pid), sig);
                }
                tracing::debug!(
                    "{} forwarded to {} workers",
                    reaper::signal_name(sig),
                    self.live_workers()
                );
            }
            Action::Reload => self.request_reload(),
            Action::Ignore(sig) => tracing::debug!("{sig} ignored"),
        }
    }

    /// Worker processes alive: current ones, reload replacements and retiring old ones.
    fn live_workers(&self) -> usize {
        self.roles.len()
    }

    /// Sends the stop signal to every live worker group and to any other child of ours, and
    /// starts draining them.
    fn begin_stop(&mut self, ending: Ending, now: Instant, os: &mut dyn Os) {
        self.shutdown.begin(ending);
        self.drains.begin_stop(now);
        os.close();
        self.reload.cancel();
        for i in 0..self.workers.len() {
            if let Some(pid) = self.workers[i].pid() {
                self.drain(Target::Group(pid), Duration::ZERO, now, os);
            }
            if let Some(next) = self.workers[i].drop_replacement() {
                self.drain(Target::Group(next.pid), Duration::ZERO, now, os);
                self.roles.insert(next.pid, Role::Retiring(i));
            }
            self.workers[i].stopping();
        }
        self.sweep_strays(now, os);
    }

    /// Children of ours outside every known group (they called setsid, or are orphans of a
    /// worker's children that did): stop them too, so nothing outlives the pool unasked.
    fn sweep_strays(&mut self, now: Instant, os: &mut dyn Os) {
        for child in os.children() {
            if !self.drains.covers(child.pid, child.pgid) && !child.zombie {
                tracing::info!("stopping stray process {}", child.pid);
                self.drain(Target::Process(child.pid), Duration::ZERO, now, os);
            }
        }
    }

    /// Stops routing to `target` at once, sends it the stop signal after `delay`, and SIGKILL
    /// after the kill timeout on top.
    fn drain(&mut self, target: Target, delay: Duration, now: Instant, os: &mut dyn Os) {
        if let Target::Group(pgid) = target {
            os.unroute(pgid);
        }
        self.drains.add(os, target, delay, now);
    }

    /// Readiness news: a worker (or a replacement) accepts connections.
    pub fn on_ready(&mut self, pid: Pid, now: Instant, os: &mut dyn Os) {
        if self.shutdown.is_ending() {
            return;
        }
        os.route_ready(pid);
        match self.roles.get(&pid).copied() {
            Some(Role::Replacement(i, _)) => self.promote(i, pid, now, os),
            Some(Role::Current(i)) => {
                if let Some(took) = self.workers[i].ready(now) {
                    tracing::info!(
                        "worker {} ready (pid {pid}) after {}",
                        self.workers[i].slot(),
                        human(took)
                    );
                }
            }
            _ => {}
        }
    }

    /// Restarts workers that did not become ready in time; ends a replacement that did not
    /// either.
    fn check_readiness(&mut self, now: Instant, os: &mut dyn Os) {
        if self.shutdown.is_ending() {
            return;
        }
        let timeout = self.s.ready_timeout;
        if !self.served {
            let min_uptime = self.s.rules.min_uptime;
            self.served = self
                .workers
                .iter()
                .any(|w| w.serving_for(now) >= Some(min_uptime));
        }
        for i in 0..self.workers.len() {
            let slot = self.workers[i].slot();
            if let Some(pid) = self.workers[i].unready_for(timeout, now) {
                tracing::warn!(
                    "worker {slot} (pid {pid}) not ready after {}: restarting it ({})",
                    human(timeout),
                    self.s.not_ready_hint
                );
                self.drain(Target::Group(pid), Duration::ZERO, now, os);
                self.workers[i].restarting();
            }
            if let Some(next) = self.workers[i].next()
                && now.saturating_duration_since(next.since) >= timeout
            {
                self.workers[i].drop_replacement();
                self.drain(Target::Group(next.pid), Duration::ZERO, now, os);
                let role = self.roles.insert(next.pid, Role::Retiring(i));
                let cause = match role {
                    Some(Role::Replacement(_, cause)) => cause,
                    _ => Cause::Reload,
                };
                self.replacement_failed(
                    cause,
                    &format!(
                        "the replacement of worker {slot} (pid {}) was not ready after {}",
                        next.pid,
                        human(timeout)
                    ),
                );
            }
        }
    }

    /// Every check interval, hands the memory watch each ready worker's group RSS.
    fn check_memory(&mut self, now: Instant, os: &mut dyn Os) {
        if self.shutdown.is_ending() || !self.memory.due(now) {
            return;
        }
        let groups: Vec<i32> = self
            .workers
            .iter()
            .filter(|w| w.is_ready() && w.next().is_none())
            .filter_map(|w| w.pid().map(Pid::as_raw))
            .collect();
        let usage = os.usage(&groups);
        let rss: Vec<(usize, Option<u64>)> = self
            .workers
            .iter()
            .map(|w| {
                let bytes = w.pid().and_then(|p| usage.get(&p.as_raw()));
                (w.slot(), bytes.map(|u| u.rss_bytes))
            })
            .collect();
        self.memory.check(now, &rss);
    }

    /// What a reload request does now, for the client that asked.
    pub fn reload_answer(&self) -> crate::control::ReloadAnswer {
        self.reload.answer(self.shutdown.is_ending())
    }

    /// SIGHUP or `corepool reload`: replace every running worker, a batch at a time.
    pub fn request_reload(&mut self) {
        if self.shutdown.is_ending() {
            tracing::info!("reload requested during the stop: ignored");
            return;
        }
        let running = self.running_slots();
        self.reload.request(running);
    }

    fn running_slots(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&i| self.workers[i].is_running())
            .collect()
    }

    /// Starts the next batch of replacements (the reload's, else the memory watch's) once
    /// none is in flight.
    fn advance_replacements(&mut self, now: Instant, os: &mut dyn Os) {
        if self.workers.iter().any(|w| w.next().is_some()) {
            return;
        }
        let running = self.running_slots();
        let mut batch = self.reload.next_batch(|| running);
        let cause = if batch.is_empty() {
            batch = (0..self.s.reload_batch.max(1))
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
            // A slot that is restarting anyway gets new code by itself.
            if !self.workers[i].is_running() {
                continue;
            }
            let slot = self.workers[i].slot();
            match os.spawn(slot, self.workers.len()) {
                Ok(pid) => {
                    tracing::info!("worker {slot}: replacement started, pid {pid}");
                    self.workers[i].replacing(pid, now);
                    self.roles.insert(pid, Role::Replacement(i, cause));
                    if !self.s.needs_ready {
                        self.on_ready(pid, now, os);
                    }
                }
                Err(err) => {
                    self.replacement_failed(
                        cause,
                        &format!("cannot start a replacement for worker {slot}: {err}"),
                    );
                    return;
                }
            }
        }
    }

    /// The replacement `pid` of slot i is ready: it takes the slot; the old one is stopped.
    fn promote(&mut self, i: usize, pid: Pid, now: Instant, os: &mut dyn Os) {
        let slot = self.workers[i].slot();
        let took = self.workers[i]
            .next()
            .map(|n| now.saturating_duration_since(n.since));
        let Some(old) = self.workers[i].promote() else {
            return;
        };
        tracing::info!(
            "worker {slot}: replacement pid {pid} ready after {}; stopping old pid {old}",
            human(took.unwrap_or_default())
        );
        self.roles.insert(pid, Role::Current(i));
        self.roles.insert(old, Role::Retiring(i));
        // In proxy mode the relay may have just connected to the old worker: stop routing to
        // it now, signal it a moment later, so that what already sits in its accept queue is
        // accepted before it closes its listener.
        self.drain(Target::Group(old), self.s.handoff, now, os);
    }

    fn replacement_failed(&mut self, cause: Cause, why: &str) {
        match cause {
            Cause::Reload => self.reload.abort(why),
            Cause::Memory => self.memory.failed(why),
        }
    }

    /// The exit code, once the pool is ending and nothing of it is left.
    pub fn outcome(&mut self, now: Instant, os: &mut dyn Os) -> Option<i32> {
        if !self.shutdown.is_ending() || self.live_workers() > 0 || !self.drains.is_empty() {
            return None;
        }
        // Processes that appeared since the stop began (forked by dying workers) get a turn too.
        self.sweep_strays(now, os);
        if !self.drains.is_empty() {
            return None;
        }
        self.shutdown.exit_code(self.drains.any_killed())
    }

    /// The next time something is due, if anything is.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let poll = (!self.drains.is_empty()).then_some(now + DRAIN_POLL);
        let timeout = self.s.ready_timeout;
        let readiness = self.workers.iter().flat_map(|w| {
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
        poll.into_iter()
            .chain(self.drains.next_deadline())
            .chain(self.shutdown.next_deadline())
            .chain(self.workers.iter().filter_map(Worker::due))
            .chain(readiness)
            .min()
    }

    /// The slots as the reporters show them.
    pub fn slots(&self, now: Instant) -> Vec<SlotView> {
        let ending = self.shutdown.is_ending();
        self.workers
            .iter()
            .map(|w| {
                let (state, uptime) = match w.state() {
                    State::Waiting { .. } => ("waiting", None),
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

    /// Whether the pool says it is stopping (the shutdown delay or the stop).
    pub fn stopping(&self) -> bool {
        self.shutdown.is_announced()
    }

    /// Reloads begun and memory replacements decided, for the metrics.
    pub fn counters(&self) -> (u64, u64) {
        (self.reload.count(), self.memory.restarts())
    }

    /// Who `pid` is, if it is one of the pool's processes.
    pub fn role(&self, pid: Pid) -> Option<Role> {
        self.roles.get(&pid).copied()
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
