//! The pool: N worker slots and the supervisor loop that drives them.
//!
//! The loop is single-threaded and reads top to bottom: wait for a signal, a deadline or the
//! one-second safety tick; reap every exited child; apply what happened to the slots; start what
//! is due, escalate what is late; exit when the pool is finished. Because spawning and reaping
//! happen on the same thread, no exit status can be collected behind anyone's back.
//!
//! Readiness news (from `balance`) arrives on a channel; a rolling reload (SIGHUP) gives
//! `reload_batch` slots at a time a replacement process, promotes each once it is ready and
//! stops the old one; a replacement that fails keeps the old worker and ends the reload.
//!
//! Stopping is uniform: whatever ends the pool (a stop signal, or every slot given up) sends the
//! stop signal to every live process group and *drains* them: a drained group that outlives the
//! kill timeout gets SIGKILL, and corepool exits only when every group is gone.

use crate::balance::{Balancer, Ready};
use crate::config::Config;
use crate::control::{Command, ReloadAnswer};
use crate::drain::Drains;
use crate::ending::{Ending, Shutdown, StopStep, pool_death_code};
use crate::exit;
use crate::launch::LaunchSpec;
use crate::logs::{Output, PumpHandle, Stream};
use crate::metrics::{Shared, SlotView, Snapshot};
use crate::os::{Os, RealOs, Target};
use crate::reaper::{self, Exit, ExitStatus};
use crate::reserve;
use crate::signals::{Action, SignalStream};
use crate::units::format_duration as human;
use crate::worker::{AfterExit, RestartRules, State, Worker};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often liveness of draining groups is checked while a stop is under way.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Proxy mode: time between routing away from a replaced worker and signalling it.
const PROXY_HANDOFF: Duration = Duration::from_millis(250);
/// The safety net: reap and re-check at least this often, whatever else happens.
const SAFETY_TICK: Duration = Duration::from_secs(1);
/// How often worker memory is compared with --max-memory.
const MEMORY_CHECK: Duration = Duration::from_secs(2);
/// Consecutive checks above --max-memory before a worker is replaced.
const MEMORY_STRIKES: u32 = 3;
/// How long, after the last worker is gone, to wait for their output pipes to reach EOF.
const PIPE_GRACE: Duration = Duration::from_secs(2);
/// A start that failed for corepool's own lack of resources is tried again after this long.
const RESOURCE_RETRY: Duration = Duration::from_secs(1);

/// What woke the loop.
enum Event {
    /// A deadline, the safety tick, or the first turn.
    Tick,
    Signal(Action),
    Ready(Ready),
    Reload(tokio::sync::oneshot::Sender<ReloadAnswer>),
}

/// The supervisor's whole state.
pub struct Pool {
    config: Config,
    rules: RestartRules,
    launch: LaunchSpec,
    balancer: Balancer,
    ready_rx: mpsc::UnboundedReceiver<Ready>,
    output: Output,
    /// Slots still to be replaced by the rolling reload under way, if any.
    reload: Option<VecDeque<usize>>,
    /// A reload was asked for while another ran: it follows once that one ends.
    reload_pending: bool,
    /// Old processes replaced by a reload, being stopped.
    retiring: Vec<(usize, Pid)>,
    /// What the reporters (metrics, status) see.
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    reloads: u64,
    memory_restarts: u64,
    /// Consecutive memory checks each slot spent above --max-memory, and when we last looked.
    memory_strikes: HashMap<usize, u32>,
    memory_checked: Instant,
    workers: Vec<Worker>,
    pumps: Vec<PumpHandle>,
    drains: Drains,
    /// The shutdown delay, the stop and the exit code.
    shutdown: Shutdown,
    /// Signals, liveness, reaping, children and usage.
    os: RealOs,
    /// Some worker process has been started: from then on a start that fails is a crash of
    /// that slot (restarted with backoff); before, it is the command that cannot run at all.
    launched_once: bool,
    /// The last worker exit, for the pool-death status.
    last_status: Option<ExitStatus>,
    /// When the pool started, for `--fail-fast`.
    started_at: Instant,
    /// Some worker has served: been ready for `--min-uptime`. Until then `--fail-fast` holds.
    served: bool,
}

impl Pool {
    pub fn new(
        config: Config,
        launch: LaunchSpec,
        balancer: Balancer,
        ready_rx: mpsc::UnboundedReceiver<Ready>,
        output: Output,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Pool {
        let now = Instant::now();
        let rules = RestartRules {
            policy: config.restart,
            delay: config.restart_delay,
            max_delay: config.max_restart_delay,
            min_uptime: config.min_uptime,
            max_restarts: config.max_restarts,
            fail_fast: config.fail_fast,
        };
        let workers = (0..config.instances)
            .map(|slot| Worker::new(slot, now))
            .collect();
        let drains = Drains::new(config.stop_signal, config.kill_timeout);
        let shutdown = Shutdown::new(config.shutdown_delay);
        Pool {
            config,
            rules,
            launch,
            balancer,
            ready_rx,
            output,
            reload: None,
            reload_pending: false,
            retiring: Vec::new(),
            shared,
            commands,
            reloads: 0,
            memory_restarts: 0,
            launched_once: false,
            memory_strikes: HashMap::new(),
            memory_checked: now,
            workers,
            pumps: Vec::new(),
            drains,
            shutdown,
            os: RealOs,
            last_status: None,
            started_at: now,
            served: false,
        }
    }

    /// Runs the pool until it is finished; returns corepool's exit code.
    ///
    /// The clock is read once per turn, at the top; every step below is given that time.
    pub async fn run(mut self, mut signals: SignalStream) -> i32 {
        self.balancer.start();
        reserve::refill();
        let mut event = Event::Tick;
        loop {
            let now = Instant::now();
            match event {
                Event::Tick => {}
                Event::Signal(action) => self.on_signal(action, now),
                Event::Ready(ready) => self.on_ready(ready, now),
                Event::Reload(reply) => {
                    let _ = reply.send(self.reload_answer());
                    self.begin_reload();
                }
            }
            // A reap after every wake, whatever woke us.
            for exit in self.os.reap() {
                self.on_exit(exit, now);
            }
            self.start_due(now);
            self.check_readiness(now);
            self.check_memory(now);
            self.advance_reload(now);
            self.check_shutdown_delay(now);
            self.drains
                .escalate(&mut self.os, now, self.shutdown.is_ending());
            self.publish(now);
            if let Some(code) = self.outcome(now) {
                return self.finish(code).await;
            }
            let wake = self.next_deadline(now);
            event = tokio::select! {
                action = signals.next() => Event::Signal(action),
                Some(ready) = self.ready_rx.recv() => Event::Ready(ready),
                Some(Command::Reload(reply)) = self.commands.recv() => Event::Reload(reply),
                _ = tokio::time::sleep_until(wake.into()) => Event::Tick,
            };
        }
    }

    /// Starts every slot whose time has come.
    fn start_due(&mut self, now: Instant) {
        if self.shutdown.is_ending() {
            return;
        }
        for i in 0..self.workers.len() {
            if !self.shutdown.is_ending() && self.workers[i].due().is_some_and(|at| at <= now) {
                self.start(i, now);
            }
        }
    }

    /// `spawn_once`, and once more with the descriptor reserve released if the table was full.
    fn spawn(&mut self, slot: usize) -> std::io::Result<Pid> {
        let result = match self.spawn_once(slot) {
            Err(err) if reserve::is_fd_shortage(&err) => {
                let freed = reserve::release();
                tracing::warn!(
                    "worker {slot}: no descriptor left ({err}): using the {freed} held in reserve"
                );
                self.spawn_once(slot)
            }
            other => other,
        };
        reserve::refill();
        result
    }

    /// Launches a process for `slot` with its share of the port; its output is pumped.
    fn spawn_once(&mut self, slot: usize) -> std::io::Result<Pid> {
        let handover = self.balancer.handover(slot, self.workers.len())?;
        let launched = self.launch.launch(&handover.io)?;
        let pid = launched.pid.as_raw();
        self.balancer.watch(handover, pid);
        self.pumps
            .push(self.output.pump(launched.stdout, Stream::Stdout, slot, pid));
        self.pumps
            .push(self.output.pump(launched.stderr, Stream::Stderr, slot, pid));
        self.pumps.retain(|p| !p.is_finished());
        Ok(launched.pid)
    }

    fn start(&mut self, i: usize, now: Instant) {
        let slot = self.workers[i].slot();
        match self.spawn(slot) {
            Ok(pid) => {
                self.launched_once = true;
                let ready = !self.balancer.needs_ready();
                self.workers[i].started(pid, now, ready);
                tracing::info!("worker {slot} started, pid {pid}");
            }
            Err(err) => {
                let program = self.launch.program.display();
                let code = match (err.kind(), err.raw_os_error()) {
                    (std::io::ErrorKind::NotFound, _) => exit::NOT_FOUND,
                    (std::io::ErrorKind::PermissionDenied, _) => exit::NOT_EXECUTABLE,
                    (_, Some(libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY)) => exit::NOT_EXECUTABLE,
                    // fork or pipe failures (EAGAIN, EMFILE): corepool's own trouble.
                    _ => exit::STARTUP,
                };
                if !self.launched_once {
                    // The file exists and is executable (checked before), so ENOENT from
                    // execve means what it names to run it is missing.
                    let hint = match err.raw_os_error() {
                        Some(libc::ENOENT) => " (its #! interpreter or ELF loader does not exist)",
                        Some(libc::ENOEXEC) => {
                            " (neither a binary for this machine nor a #! script)"
                        }
                        _ => "",
                    };
                    tracing::error!("cannot run {program}: {err}{hint}");
                    self.begin_stop(Ending::PoolDied(code), now);
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
                self.after_exit(i, ExitStatus::Code(code), now, true);
            }
        }
    }

    /// Applies one reaped exit: a worker's, or an orphan's.
    fn on_exit(&mut self, exit: Exit, now: Instant) {
        self.balancer.exited(exit.pid.as_raw());
        if let Some(k) = self.retiring.iter().position(|&(_, pid)| pid == exit.pid) {
            let (slot, pid) = self.retiring.remove(k);
            tracing::info!(
                "old worker {slot} (pid {pid}) exited after its replacement: {}",
                exit.status
            );
            return;
        }
        if let Some(i) = self
            .workers
            .iter()
            .position(|w| w.next().map(|n| n.pid) == Some(exit.pid))
        {
            self.workers[i].drop_replacement();
            self.abort_reload(&format!(
                "the replacement of worker {} (pid {}) exited before it was ready: {}",
                self.workers[i].slot(),
                exit.pid,
                exit.status
            ));
            self.drain_leftovers(self.workers[i].slot(), exit.pid, now);
            return;
        }
        let Some(i) = self.workers.iter().position(|w| w.pid() == Some(exit.pid)) else {
            tracing::debug!("reaped orphan pid {} ({})", exit.pid, exit.status);
            return;
        };
        let slot = self.workers[i].slot();
        if self.workers[i].next().is_some() && !self.shutdown.is_ending() {
            // The old process died during its reload: the replacement takes over at once.
            tracing::warn!(
                "worker {slot} (pid {}) exited during its reload: {}; its replacement takes over",
                exit.pid,
                exit.status
            );
            self.workers[i].take_over();
            self.last_status = Some(exit.status);
            self.drain_leftovers(slot, exit.pid, now);
            return;
        }
        let was_stopping = matches!(self.workers[i].state(), State::Stopping { .. });
        if was_stopping || self.shutdown.is_ending() {
            tracing::info!("worker {slot} (pid {}) exited: {}", exit.pid, exit.status);
        } else {
            tracing::warn!("worker {slot} (pid {}) exited: {}", exit.pid, exit.status);
            self.drain_leftovers(slot, exit.pid, now);
        }
        self.after_exit(i, exit.status, now, false);
    }

    /// Whatever a dead leader left behind in its group must not linger (it may hold the port
    /// or a lock): it gets the stop signal and the kill timeout, like a stop.
    fn drain_leftovers(&mut self, slot: usize, leader: Pid, now: Instant) {
        let group = Target::Group(leader);
        if self.os.alive(group) {
            tracing::info!("worker {slot}: stopping what is left of process group {leader}");
            self.drain(group, now);
        }
    }

    fn after_exit(&mut self, i: usize, status: ExitStatus, now: Instant, start_failed: bool) {
        self.last_status = Some(status);
        let stopping = self.shutdown.is_ending();
        self.served |= self.workers[i].serving_for(now) >= Some(self.rules.min_uptime);
        let fail_fast = !self.served
            && !self.rules.fail_fast.is_zero()
            && now.saturating_duration_since(self.started_at) >= self.rules.fail_fast;
        let worker = &mut self.workers[i];
        let after = if start_failed {
            worker.start_failed(status, now, &self.rules, stopping, fail_fast)
        } else {
            worker.exited(status, now, &self.rules, stopping, fail_fast)
        };
        match after {
            AfterExit::RestartAt(at) => tracing::info!(
                "worker {} restarts in {} (restart {}, {} short-lived exits in a row)",
                worker.slot(),
                human(at.saturating_duration_since(now)),
                worker.restarts(),
                worker.failures()
            ),
            AfterExit::GaveUp => {
                let by_count =
                    self.rules.max_restarts > 0 && worker.failures() >= self.rules.max_restarts;
                if by_count {
                    tracing::error!(
                        "worker {} given up after {} failed runs in a row (each exited within \
                         {} of its start, or before it was ready)",
                        worker.slot(),
                        worker.failures(),
                        human(self.rules.min_uptime)
                    );
                } else {
                    tracing::error!(
                        "worker {} given up ({status}): no worker has served in the {} since \
                         start (--fail-fast), and it failed {} times in a row",
                        worker.slot(),
                        human(self.rules.fail_fast),
                        worker.failures(),
                    );
                }
                let slot = worker.slot();
                self.balancer.abandon(slot);
            }
            AfterExit::Finished => {}
        }
        if !self.shutdown.is_ending() && self.workers.iter().all(Worker::is_over) {
            let code = pool_death_code(status, self.rules.policy);
            tracing::error!("every worker slot is finished: the pool is dead (exit {code})");
            self.begin_stop(Ending::PoolDied(code), now);
        }
    }

    fn on_signal(&mut self, action: Action, now: Instant) {
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
                        self.config.stop_signal,
                        human(self.config.kill_timeout)
                    );
                    self.begin_stop(Ending::Stop(sig), now);
                }
                StopStep::KillNow => {
                    tracing::warn!("{sig} again: killing every remaining process group now");
                    self.drains.hurry(now);
                }
            },
            Action::Forward(sig) => {
                let current = self.workers.iter().filter_map(Worker::pid);
                let next = self.workers.iter().filter_map(|w| w.next().map(|n| n.pid));
                let retiring = self.retiring.iter().map(|&(_, pid)| pid);
                for pid in current.chain(next).chain(retiring) {
                    self.os.signal_raw(Target::Group(pid), sig);
                }
                tracing::debug!(
                    "{} forwarded to {} workers",
                    reaper::signal_name(sig),
                    self.live_workers()
                );
            }
            Action::Reload => self.begin_reload(),
            Action::Ignore(sig) => tracing::debug!("{sig} ignored"),
        }
    }

    /// Worker processes alive: current ones, reload replacements and retiring old ones.
    fn live_workers(&self) -> usize {
        let current = self.workers.iter().filter(|w| w.pid().is_some()).count();
        let next = self.workers.iter().filter(|w| w.next().is_some()).count();
        current + next + self.retiring.len()
    }

    /// Sends the stop signal to every live worker group and to any other child of ours, and
    /// starts draining them.
    fn begin_stop(&mut self, ending: Ending, now: Instant) {
        self.shutdown.begin(ending);
        self.drains.begin_stop(now);
        self.balancer.close();
        self.reload_pending = false;
        if self.reload.take().is_some() {
            tracing::info!("rolling reload cancelled by the stop");
        }
        for i in 0..self.workers.len() {
            if let Some(pid) = self.workers[i].pid() {
                self.drain(Target::Group(pid), now);
            }
            if let Some(next) = self.workers[i].drop_replacement() {
                self.drain(Target::Group(next.pid), now);
                self.retiring.push((self.workers[i].slot(), next.pid));
            }
            self.workers[i].stopping();
        }
        self.sweep_strays(now);
    }

    /// Children of ours outside every known group (they called setsid, or are orphans of a
    /// worker's children that did): stop them too, so nothing outlives the pool unasked.
    fn sweep_strays(&mut self, now: Instant) {
        for child in self.os.children() {
            if !self.drains.covers(child.pid, child.pgid) && !child.zombie {
                tracing::info!("stopping stray process {}", child.pid);
                self.drain(Target::Process(child.pid), now);
            }
        }
    }

    /// Readiness news: a worker (or a reload's replacement) accepts connections.
    fn on_ready(&mut self, ready: Ready, now: Instant) {
        let pid = Pid::from_raw(ready.pid);
        if self.shutdown.is_ending() {
            return;
        }
        self.balancer.worker_ready(ready.pid);
        if let Some(i) = self
            .workers
            .iter()
            .position(|w| w.next().map(|n| n.pid) == Some(pid))
        {
            let slot = self.workers[i].slot();
            let took = self.workers[i]
                .next()
                .map(|n| now.saturating_duration_since(n.since));
            if let Some(old) = self.workers[i].promote() {
                tracing::info!(
                    "worker {slot}: replacement pid {pid} ready after {}; stopping old pid {old}",
                    human(took.unwrap_or_default())
                );
                // In proxy mode the relay may have just connected to the old worker: stop
                // routing to it now, signal it a moment later, so that what already sits in its
                // accept queue is accepted before it closes its listener.
                let handoff = match self.balancer.mode {
                    crate::balance::Mode::Proxy => PROXY_HANDOFF,
                    _ => Duration::ZERO,
                };
                self.drain_after(Target::Group(old), handoff, now);
                self.retiring.push((slot, old));
            }
            return;
        }
        if let Some(worker) = self.workers.iter_mut().find(|w| w.pid() == Some(pid))
            && let Some(took) = worker.ready(now)
        {
            tracing::info!(
                "worker {} ready (pid {pid}) after {}",
                worker.slot(),
                human(took)
            );
        }
    }

    /// Restarts workers that did not become ready in time; ends a reload whose replacement
    /// did not either.
    fn check_readiness(&mut self, now: Instant) {
        if self.shutdown.is_ending() {
            return;
        }
        if !self.served {
            let min_uptime = self.rules.min_uptime;
            self.served = self
                .workers
                .iter()
                .any(|w| w.serving_for(now) >= Some(min_uptime));
        }
        let timeout = self.config.ready_timeout;
        for i in 0..self.workers.len() {
            if let Some(pid) = self.workers[i].unready_for(timeout, now) {
                let how = match self.balancer.mode {
                    crate::balance::Mode::Proxy => {
                        "its private port ($PORT on 127.0.0.1) never accepted a connection"
                    }
                    _ if self.config.ready_on == crate::config::ReadyOn::Message => {
                        "with --ready-on message a worker is ready once it calls \
                         process.send('ready'), and it never did"
                    }
                    _ => {
                        "a Node server reports itself through corepool's preload when it \
                         listens; another program sends READY=1 to $NOTIFY_SOCKET, or use \
                         --balance proxy. A worker that serves no port (a queue consumer) \
                         wants --balance none; one that listens on another port wants --port"
                    }
                };
                tracing::warn!(
                    "worker {} (pid {pid}) not ready after {}: restarting it ({how})",
                    self.workers[i].slot(),
                    human(timeout)
                );
                self.drain(Target::Group(pid), now);
                self.workers[i].restarting();
            }
            if let Some(next) = self.workers[i].next()
                && now.saturating_duration_since(next.since) >= timeout
            {
                let slot = self.workers[i].slot();
                self.workers[i].drop_replacement();
                self.drain(Target::Group(next.pid), now);
                self.retiring.push((slot, next.pid));
                self.abort_reload(&format!(
                    "the replacement of worker {slot} (pid {}) was not ready after {}",
                    next.pid,
                    human(timeout)
                ));
            }
        }
    }

    /// What `begin_reload` is about to do, for the client that asked.
    fn reload_answer(&self) -> ReloadAnswer {
        if self.shutdown.is_ending() {
            ReloadAnswer::Stopping
        } else if self.reload.is_some() {
            ReloadAnswer::Follows
        } else {
            ReloadAnswer::Started
        }
    }

    /// SIGHUP: replace every running worker, `reload_batch` at a time.
    fn begin_reload(&mut self) {
        if self.shutdown.is_ending() {
            tracing::info!("reload requested during the stop: ignored");
            return;
        }
        if self.reload.is_some() {
            // The workers this reload already replaced may predate what the request is for
            // (new code deployed in between): a whole reload follows this one. Requests
            // that arrive meanwhile are the same request.
            if !self.reload_pending {
                tracing::info!("a rolling reload is under way; another will follow it");
            }
            self.reload_pending = true;
            return;
        }
        let slots: VecDeque<usize> = (0..self.workers.len())
            .filter(|&i| self.workers[i].is_running())
            .collect();
        tracing::info!(
            "rolling reload of {} workers, {} at a time",
            slots.len(),
            self.config.reload_batch
        );
        self.reloads += 1;
        self.reload = Some(slots);
    }

    /// Starts the next batch of replacements once the current one is done.
    fn advance_reload(&mut self, now: Instant) {
        if self.workers.iter().any(|w| w.next().is_some()) {
            return;
        }
        if self.reload.is_none() && std::mem::take(&mut self.reload_pending) {
            self.begin_reload();
        }
        let Some(queue) = &mut self.reload else {
            return;
        };
        if queue.is_empty() {
            self.reload = None;
            tracing::info!("rolling reload complete");
            return;
        }
        let batch: Vec<usize> = (0..self.config.reload_batch)
            .map_while(|_| queue.pop_front())
            .collect();
        for i in batch {
            // A slot that is restarting anyway gets new code by itself.
            if !self.workers[i].is_running() {
                continue;
            }
            let slot = self.workers[i].slot();
            match self.spawn(slot) {
                Ok(pid) => {
                    tracing::info!("worker {slot}: replacement started, pid {pid}");
                    self.workers[i].replacing(pid, now);
                    if !self.balancer.needs_ready() {
                        self.on_ready(Ready { pid: pid.as_raw() }, now);
                    }
                }
                Err(err) => {
                    self.abort_reload(&format!(
                        "cannot start a replacement for worker {slot}: {err}"
                    ));
                    return;
                }
            }
        }
    }

    fn abort_reload(&mut self, why: &str) {
        if self.reload.take().is_some() {
            tracing::error!("rolling reload stopped: {why}; the old workers keep serving");
        } else {
            tracing::warn!("{why}");
        }
    }

    /// The shutdown delay is over: begin the stop.
    fn check_shutdown_delay(&mut self, now: Instant) {
        if let Some(sig) = self.shutdown.delay_over(now) {
            tracing::info!(
                "shutdown delay over: stopping {} workers with {}, kill timeout {}",
                self.live_workers(),
                self.config.stop_signal,
                human(self.config.kill_timeout)
            );
            self.begin_stop(Ending::Stop(sig), now);
        }
    }

    /// Every MEMORY_CHECK, compares each ready worker's process-group RSS with --max-memory;
    /// a worker above it MEMORY_STRIKES times in a row is queued for a graceful replacement.
    fn check_memory(&mut self, now: Instant) {
        let Some(limit) = self.config.max_memory else {
            return;
        };
        if self.shutdown.is_ending()
            || now.saturating_duration_since(self.memory_checked) < MEMORY_CHECK
        {
            return;
        }
        self.memory_checked = now;
        let groups: Vec<i32> = self
            .workers
            .iter()
            .filter(|w| w.is_ready() && w.next().is_none())
            .filter_map(|w| w.pid().map(Pid::as_raw))
            .collect();
        let usage = self.os.usage(&groups);
        for i in 0..self.workers.len() {
            let slot = self.workers[i].slot();
            let rss = self.workers[i]
                .pid()
                .and_then(|p| usage.get(&p.as_raw()))
                .map(|u| u.rss_bytes);
            let Some(rss) = rss.filter(|&r| r > limit) else {
                self.memory_strikes.remove(&slot);
                continue;
            };
            let strikes = self.memory_strikes.entry(slot).or_insert(0);
            *strikes += 1;
            if *strikes < MEMORY_STRIKES {
                continue;
            }
            self.memory_strikes.remove(&slot);
            let queue = self.reload.get_or_insert_with(VecDeque::new);
            if !queue.contains(&i) {
                tracing::warn!(
                    "worker {slot}: {} MiB resident, above --max-memory {} MiB for {} checks: \
                     replacing it",
                    rss >> 20,
                    limit >> 20,
                    MEMORY_STRIKES
                );
                queue.push_back(i);
                self.memory_restarts += 1;
            }
        }
    }

    /// Hands the reporters a fresh view of the pool.
    fn publish(&self, now: Instant) {
        let slots = self
            .workers
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
                    ready: w.is_ready() && !self.shutdown.is_ending(),
                    restarts: w.restarts(),
                    uptime,
                }
            })
            .collect();
        let (open, total) = self.balancer.connections();
        self.shared.publish(Snapshot {
            heartbeat: now,
            slots,
            stopping: self.shutdown.is_announced(),
            reloads: self.reloads,
            memory_restarts: self.memory_restarts,
            open_connections: open,
            connections_total: total,
            connection_limit: self.balancer.connection_limit(),
        });
    }

    fn drain(&mut self, target: Target, now: Instant) {
        self.drain_after(target, Duration::ZERO, now);
    }

    /// Stops routing to `target` at once, sends it the stop signal after `delay`, and SIGKILL
    /// after the kill timeout on top.
    fn drain_after(&mut self, target: Target, delay: Duration, now: Instant) {
        if let Target::Group(pgid) = target {
            self.balancer.forget(pgid.as_raw());
        }
        self.drains.add(&mut self.os, target, delay, now);
    }

    /// The exit code, once the pool is ending and nothing of it is left.
    fn outcome(&mut self, now: Instant) -> Option<i32> {
        if !self.shutdown.is_ending() || self.live_workers() > 0 || !self.drains.is_empty() {
            return None;
        }
        // Processes that appeared since the stop began (forked by dying workers) get a turn too.
        self.sweep_strays(now);
        if !self.drains.is_empty() {
            return None;
        }
        self.shutdown.exit_code(self.drains.any_killed())
    }

    fn next_deadline(&self, now: Instant) -> Instant {
        let mut next = now + SAFETY_TICK;
        if !self.drains.is_empty() {
            next = next.min(now + DRAIN_POLL);
        }
        let deadlines = self.drains.next_deadline().into_iter();
        let deadlines = deadlines.chain(self.shutdown.next_deadline());
        let starts = self.workers.iter().filter_map(Worker::due);
        let timeout = self.config.ready_timeout;
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
        for at in deadlines.chain(starts).chain(readiness) {
            next = next.min(at);
        }
        next
    }

    /// Lets the workers' last output through, then closes the log writers.
    async fn finish(self, code: i32) -> i32 {
        let deadline = Instant::now() + PIPE_GRACE;
        while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for pump in &self.pumps {
            pump.abort();
        }
        tracing::info!("exiting with code {code}");
        self.output.finish(PIPE_GRACE);
        code
    }
}
