//! The supervision core: the slots, who each pid is, and every decision the pool takes about
//! them, with no process, clock or socket of its own.
//!
//! Everything the core does to the world goes through [`Os`] (spawn, signal, liveness,
//! children, usage, routing), and every call is given the time: so the unit tests drive it
//! with `FakeOs` and a fake clock. The concerns live in their own types: [`Reload`] (the
//! rolling reload), [`MemoryWatch`] (--max-memory), [`Drains`] (the stop signal and SIGKILL
//! escalation), [`Starts`] (the due-start queue, `--start-concurrency` and a start's failure)
//! and [`Shutdown`] (the shutdown delay, the stop and the exit code); this module
//! ties them to the slots. One map answers "who is this pid": the current process of a slot,
//! a replacement for it, or an old one retiring.

use crate::drain::Drains;
use crate::ending::{Ending, Shutdown, StopStep, pool_died};
use crate::metrics::SlotView;
use crate::os::{Os, Target};
use crate::reaper::{Exit, ExitStatus};
use crate::replace::Replacements;
use crate::resize::{self, Resize};
use crate::scale::{Origin, Scaling};
use crate::signals::Action;
use crate::slots::{Role, Slots};
use crate::starts::{Start, Starts};
use crate::units::format_duration as human;
use crate::worker::{AfterExit, RestartRules, State, Worker};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// How often liveness of draining groups is checked while a drain is under way.
const DRAIN_POLL: Duration = Duration::from_millis(50);

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
    /// `--min-ready`: a scale never goes below it.
    pub min_ready: usize,
    /// Time between routing away from a worker a scale removes and signalling it: a worker
    /// still accepting empties its socket's queue meanwhile (socket mode), and the relay stops
    /// choosing it (proxy mode).
    pub scale_handoff: Duration,
    /// Workers spawned but not yet ready at once (`--start-concurrency`; 0: no bound). The
    /// other due starts queue, and each one's --ready-timeout counts from its actual spawn.
    pub start_concurrency: usize,
}

/// The core's whole state.
#[derive(Debug)]
pub struct Supervisor {
    s: Settings,
    slots: Slots,
    replacements: Replacements,
    drains: Drains,
    shutdown: Shutdown,
    /// The due-start queue, `--start-concurrency`, and the start itself.
    starts: Starts,
    /// When the pool started, for `--fail-fast`.
    started_at: Instant,
    /// Some worker has served: been ready for `--min-uptime`. Until then `--fail-fast` holds.
    served: bool,
    /// A `oneshot` pool of several: its workers finishing with 0 is its success, not a death.
    oneshot: bool,
    /// `corepool scale` and the CPU follow: the pin, and a scale waiting for a reload.
    scaling: Scaling,
}

impl Supervisor {
    pub fn new(s: Settings, now: Instant) -> Supervisor {
        Supervisor {
            slots: Slots::new(s.instances, now),
            replacements: Replacements::new(
                s.reload_batch,
                s.max_memory,
                s.handoff,
                s.needs_ready,
                now,
            ),
            drains: Drains::new(s.stop_signal, s.kill_timeout),
            shutdown: Shutdown::new(s.shutdown_delay),
            starts: Starts::new(s.start_concurrency, s.needs_ready, s.program.clone()),
            started_at: now,
            served: false,
            oneshot: false,
            scaling: Scaling::new(s.min_ready),
            s,
        }
    }

    /// Marks the pool `oneshot` (for its log lines: finishing with 0 is what it is for).
    pub fn set_oneshot(&mut self, oneshot: bool) {
        self.oneshot = oneshot;
    }

    /// What is due at `now`: starts, readiness timeouts, the memory check, the reload's next
    /// batch, the end of the shutdown delay, drain escalation.
    pub fn step(&mut self, now: Instant, os: &mut dyn Os) {
        self.start_due(now, os);
        self.check_readiness(now, os);
        if !self.shutdown.is_ending() {
            let (slots, drains) = (&mut self.slots, &mut self.drains);
            self.replacements.check_memory(slots, now, os);
            self.replacements.advance(slots, drains, now, os);
            if let Some((n, why)) = self.scaling.due(self.replacements.reloading())
                && n != self.slots.len()
                && let Err(err) = resize::resize(self.resizing(), n, &why, now, os)
            {
                tracing::error!("scale to {n} workers after the reload failed: {err}");
            }
        }
        if let Some(sig) = self.shutdown.delay_over(now) {
            self.stop_all("shutdown delay over", Ending::Stop(sig), now, os);
        }
        self.drains.escalate(os, now, self.shutdown.is_ending());
    }

    /// Starts the slots whose time has come, while fewer than `--start-concurrency` workers
    /// are spawned and not yet ready (the rest stay queued, earliest due first, and start as
    /// others become ready or exit).
    fn start_due(&mut self, now: Instant, os: &mut dyn Os) {
        if self.shutdown.is_ending() {
            return;
        }
        let due = self.starts.due(&self.slots, now);
        let mut room = self.starts.room(&self.slots);
        for (n, &i) in due.iter().enumerate() {
            if room == 0 {
                return self.starts.queued(due.len() - n);
            }
            if self.shutdown.is_ending() {
                return;
            }
            match self.starts.start(&mut self.slots, i, now, os) {
                Start::Spawned { unready } => room -= usize::from(unready),
                Start::Retrying => {}
                Start::CannotRun(code) => self.begin_stop(Ending::PoolDied(code), now, os),
                Start::Failed(code) => self.after_exit(i, ExitStatus::Code(code), now, true, os),
            }
        }
        self.starts.queue_empty();
    }

    /// Applies one reaped exit: a worker's, a replacement's, a retiring one's, or an orphan's.
    pub fn on_exit(&mut self, exit: Exit, now: Instant, os: &mut dyn Os) {
        os.route_exited(exit.pid);
        let (pid, status) = (exit.pid, exit.status);
        let i = match self.slots.exited(pid) {
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
            Some(Role::Removed(slot)) => {
                tracing::info!("worker {slot} (pid {pid}), removed by a scale, exited: {status}");
                return;
            }
            Some(Role::Replacement(i, cause)) => {
                let slot =
                    self.replacements
                        .replacement_exited(&mut self.slots, i, cause, pid, &status);
                self.drain_leftovers(slot, pid, now, os);
                return;
            }
            Some(Role::Current(i)) => i,
        };
        let slot = self.slots.worker(i).slot();
        self.replacements.current_exited(pid, slot, &status);
        if self.slots.worker(i).next().is_some() && !self.shutdown.is_ending() {
            // The old process died during its reload: the replacement takes over at once.
            tracing::warn!(
                "worker {slot} (pid {pid}) exited during its reload: {status}; its replacement \
                 takes over"
            );
            self.slots.take_over(i);
            self.drain_leftovers(slot, pid, now, os);
            return;
        }
        let was_stopping = matches!(self.slots.worker(i).state(), State::Stopping { .. });
        if was_stopping || self.shutdown.is_ending() || (self.oneshot && status.success()) {
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
            self.drains.add(os, group, Duration::ZERO, now);
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
        self.served |= self.slots.worker(i).serving_for(now) >= Some(rules.min_uptime);
        let fail_fast = !self.served
            && !rules.fail_fast.is_zero()
            && now.saturating_duration_since(self.started_at) >= rules.fail_fast;
        let worker = self.slots.worker_mut(i);
        let after = if start_failed {
            worker.start_failed(status, now, &rules, stopping, fail_fast)
        } else {
            worker.exited(status, now, &rules, stopping, fail_fast)
        };
        report(after, worker, status, &rules, now);
        if after == AfterExit::GaveUp {
            os.abandon(worker.slot());
        }
        if !self.shutdown.is_ending() && self.slots.all_over() {
            let ending = pool_died(status, rules.policy, self.oneshot);
            self.begin_stop(ending, now, os);
        }
    }

    /// A signal the signal stream decided on.
    pub fn on_signal(&mut self, action: Action, now: Instant, os: &mut dyn Os) {
        match action {
            Action::Reap => {}
            Action::Stop(sig) => match self.shutdown.on_stop_signal(sig, now) {
                StopStep::Begin => self.stop_all(sig.as_ref(), Ending::Stop(sig), now, os),
                StopStep::KillNow => self.drains.hurry(now),
                StopStep::Delay(_) | StopStep::Hurry => {}
            },
            Action::Forward(sig) => self.slots.forward(sig, os),
            Action::Reload => self.request_reload(),
            Action::Ignore(sig) => tracing::debug!("{sig} ignored"),
        }
    }

    /// Says why the pool stops (`why`) and how, and begins the stop.
    fn stop_all(&mut self, why: &str, ending: Ending, now: Instant, os: &mut dyn Os) {
        tracing::info!(
            "{why}: stopping {} workers with {}, kill timeout {}",
            self.slots.live(),
            self.s.stop_signal,
            human(self.s.kill_timeout)
        );
        self.begin_stop(ending, now, os);
    }

    /// Sends the stop signal to every live worker group and to any other child of ours, and
    /// starts draining them.
    fn begin_stop(&mut self, ending: Ending, now: Instant, os: &mut dyn Os) {
        self.shutdown.begin(ending);
        self.drains.begin_stop(now);
        os.close();
        self.replacements.cancel();
        self.scaling.cancel();
        self.slots.stop_all(&mut self.drains, now, os);
        self.drains.sweep_strays(now, os);
    }

    /// Readiness news: a worker (or a replacement) accepts connections.
    pub fn on_ready(&mut self, pid: Pid, now: Instant, os: &mut dyn Os) {
        if self.shutdown.is_ending() {
            return;
        }
        let role = self.slots.role(pid);
        if matches!(role, Some(Role::Removed(_))) {
            // Leaving the pool: it takes no connection.
            return;
        }
        os.route_ready(pid);
        match role {
            Some(Role::Replacement(i, _)) => {
                let (slots, drains) = (&mut self.slots, &mut self.drains);
                self.replacements.promote(slots, drains, i, pid, now, os);
            }
            Some(Role::Current(i)) => self.slots.ready(i, pid, now),
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
            self.served = self.slots.any_serving_for(self.s.rules.min_uptime, now);
        }
        let hint = self.s.not_ready_hint;
        self.slots
            .restart_unready(&mut self.drains, timeout, hint, now, os);
        let (slots, drains) = (&mut self.slots, &mut self.drains);
        self.replacements
            .check_timeouts(slots, drains, timeout, now, os);
    }

    /// What a reload request does now, for the client that asked.
    pub fn reload_answer(&self) -> crate::control::ReloadAnswer {
        self.replacements.answer(self.shutdown.is_ending())
    }

    /// SIGHUP or `corepool reload`: replace every running worker, a batch at a time.
    pub fn request_reload(&mut self) {
        if self.shutdown.is_ending() {
            tracing::info!("reload requested during the stop: ignored");
            return;
        }
        self.replacements.request_reload(&self.slots);
    }

    /// A scale request (`corepool scale`, the CPU follow) for `target` workers: what the pool
    /// made of it, for the client; Err when refused.
    pub fn scale(
        &mut self,
        target: usize,
        origin: Origin,
        now: Instant,
        os: &mut dyn Os,
    ) -> Result<String, String> {
        // The shutdown delay too: the pool is on its way out, a new worker would only be
        // stopped again.
        if self.shutdown.is_announced() {
            return Err("the pool is stopping; no scale".into());
        }
        let reloading = self.replacements.reloading();
        let pool = Resize {
            slots: &mut self.slots,
            drains: &mut self.drains,
            handoff: self.s.scale_handoff,
        };
        resize::request(&mut self.scaling, target, origin, reloading, pool, now, os)
    }

    /// What a scale changes: the slots, and the drains of removed workers.
    fn resizing(&mut self) -> Resize<'_> {
        Resize {
            slots: &mut self.slots,
            drains: &mut self.drains,
            handoff: self.s.scale_handoff,
        }
    }

    /// Whether a manual `corepool scale` pinned the worker count.
    pub fn pinned(&self) -> bool {
        self.scaling.is_pinned()
    }

    /// The worker count the pool runs (its slots).
    pub fn configured(&self) -> usize {
        self.slots.len()
    }

    /// The exit code, once the pool is ending and nothing of it is left.
    pub fn outcome(&mut self, now: Instant, os: &mut dyn Os) -> Option<i32> {
        if !self.shutdown.is_ending() || self.slots.live() > 0 || !self.drains.is_empty() {
            return None;
        }
        // Processes that appeared since the stop began (forked by dying workers) get a turn too.
        self.drains.sweep_strays(now, os);
        if !self.drains.is_empty() {
            return None;
        }
        self.shutdown.exit_code(self.drains.any_killed())
    }

    /// The next time something is due, if anything is.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let poll = (!self.drains.is_empty()).then_some(now + DRAIN_POLL);
        poll.into_iter()
            .chain(self.drains.next_deadline())
            .chain(self.shutdown.next_deadline())
            .chain(
                self.slots
                    .deadlines(self.s.ready_timeout, self.starts.room(&self.slots) > 0),
            )
            .min()
    }

    /// The slots as the reporters show them.
    pub fn slots(&self, now: Instant) -> Vec<SlotView> {
        self.slots.views(now, self.shutdown.is_ending())
    }

    /// The processes leaving the pool (replaced by a reload, or of slots a scale removed) as
    /// the reporters show them: (slot, pid, "retiring" or "removed").
    pub fn leaving(&self) -> Vec<(usize, i32, &'static str)> {
        self.slots
            .leaving()
            .into_iter()
            .map(|(slot, pid, state)| (slot, pid.as_raw(), state))
            .collect()
    }

    /// Whether the pool says it is stopping (the shutdown delay or the stop).
    pub fn stopping(&self) -> bool {
        self.shutdown.is_announced()
    }

    /// Reloads begun and memory replacements decided, for the metrics.
    pub fn counters(&self) -> (u64, u64) {
        self.replacements.counters()
    }

    /// Why the pool ends, once it does.
    pub fn ending(&self) -> Option<Ending> {
        self.shutdown.ending()
    }

    /// Another pool of the container died: stop this one as a stop signal would (no
    /// shutdown delay; the container's exit code is the dead pool's).
    pub fn stop_now(&mut self, why: &str, now: Instant, os: &mut dyn Os) {
        if self.shutdown.is_ending() {
            return;
        }
        self.stop_all(why, Ending::Stop(Signal::SIGTERM), now, os);
    }

    /// Who `pid` is, if it is one of the pool's processes.
    pub fn role(&self, pid: Pid) -> Option<Role> {
        self.slots.role(pid)
    }
}

/// Says what follows a worker's exit.
fn report(
    after: AfterExit,
    worker: &Worker,
    status: ExitStatus,
    rules: &RestartRules,
    now: Instant,
) {
    let (slot, failures) = (worker.slot(), worker.failures());
    match after {
        AfterExit::RestartAt(at) => tracing::info!(
            "worker {slot} restarts in {} (restart {}, {failures} short-lived exits in a row)",
            human(at.saturating_duration_since(now)),
            worker.restarts(),
        ),
        AfterExit::GaveUp if rules.max_restarts > 0 && failures >= rules.max_restarts => {
            tracing::error!(
                "worker {slot} given up after {failures} failed runs in a row (each exited \
                 within {} of its start, or before it was ready)",
                human(rules.min_uptime)
            )
        }
        AfterExit::GaveUp => tracing::error!(
            "worker {slot} given up ({status}): no worker has served in the {} since start \
             (--fail-fast), and it failed {failures} times in a row",
            human(rules.fail_fast),
        ),
        AfterExit::Finished => {}
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
pub(crate) mod tests;
