//! A worker: one slot of the pool and its lifecycle as an explicit state machine.
//!
//! The slot moves between states only through the verbs below, modelled on systemctl's
//! (`start`, `stop`) and the kernel's news (`exited`); the pool decides *when* to call them and
//! this module decides *what follows*: restart now, later (backoff), or never.
//!
//! ```text
//!            start               stop                 exited
//!  Waiting ─────────▶ Running ──────────▶ Stopping ─────────────▶ Done
//!     ▲            (ready: false→true)        │ (restart: never became ready)
//!     ├── backoff ◀──────┤ exited ◀───────────┘
//!     │                  │ (restart policy says again)
//!     │                  ├──────────────────────────────────────▶ Done    (policy says no)
//!     │                  └──────────────────────────────────────▶ GivenUp (too many short exits)
//! ```
//!
//! A rolling reload gives a running slot a `next` process: once `next` is ready it takes the
//! slot's place (`promote`) and the old process is stopped by the pool.
//!
//! Nothing here touches processes: `launch` starts them, the reaper reports their exits, and
//! the pool turns both into the verbs below.

use crate::reaper::ExitStatus;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// When an exited worker is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn parse(text: &str) -> Result<RestartPolicy, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" | "on_failure" => Ok(RestartPolicy::OnFailure),
            "never" | "no" => Ok(RestartPolicy::Never),
            other => Err(format!(
                "'{other}' is not a restart policy (always, on-failure or never)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running; to be started at `at` (the first start, or after a restart backoff).
    Waiting { at: Instant },
    /// The process `pid` runs (and leads process group `pid`); `ready` once it accepts
    /// connections.
    Running {
        pid: Pid,
        since: Instant,
        ready: bool,
    },
    /// The stop signal was sent to the process group; waiting for the leader to exit. With
    /// `restart`, the slot starts again afterwards (a worker that never became ready).
    Stopping {
        pid: Pid,
        since: Instant,
        restart: bool,
    },
    /// Exited and will not be started again (restart policy, or the pool is stopping).
    Done { status: Option<ExitStatus> },
    /// Too many consecutive short-lived exits: the slot is abandoned.
    GivenUp { status: ExitStatus },
}

/// The restart rules, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RestartRules {
    pub policy: RestartPolicy,
    pub delay: Duration,
    pub max_delay: Duration,
    pub min_uptime: Duration,
    /// Consecutive short-lived exits before giving up; 0 never gives up.
    pub max_restarts: u32,
    /// While the pool has never served, a failing slot is given up once this long has passed
    /// since the pool started (zero: only `max_restarts` gives up).
    pub fail_fast: Duration,
}

impl RestartRules {
    /// Backoff after the `failures`-th consecutive short-lived exit (0 after a long life).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay.max(self.delay))
    }
}

/// What the pool should do after a worker's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start it again at this time.
    RestartAt(Instant),
    /// The slot is finished (policy, or the pool is stopping).
    Finished,
    /// The slot is given up after too many short-lived exits.
    GaveUp,
}

/// One slot of the pool.
#[derive(Debug)]
pub struct Worker {
    slot: usize,
    state: State,
    /// Consecutive exits that came sooner than `min_uptime`.
    failures: u32,
    /// How many times this slot was started again.
    restarts: u64,
    /// The replacement started by a rolling reload, until it is ready.
    next: Option<Next>,
}

/// A replacement process of a rolling reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    pub pid: Pid,
    pub since: Instant,
}

impl Worker {
    pub fn new(slot: usize, now: Instant) -> Worker {
        Worker {
            slot,
            state: State::Waiting { at: now },
            failures: 0,
            restarts: 0,
            next: None,
        }
    }

    /// The slot number.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Where the slot is in its life.
    pub fn state(&self) -> State {
        self.state
    }

    /// Consecutive exits that came sooner than `min_uptime`.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How many times this slot was started again.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Whether the slot runs a process (not waiting, stopping or over).
    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    /// The replacement of a rolling reload, until it is ready.
    pub fn next(&self) -> Option<Next> {
        self.next
    }

    /// Verb `replace`: a rolling reload started `pid` to take this slot's place once ready.
    pub fn replacing(&mut self, pid: Pid, now: Instant) {
        self.next = Some(Next { pid, since: now });
    }

    /// Verb `abandon_replacement`: the reload's replacement exited, timed out or is being
    /// stopped; the current process keeps the slot. Returns the replacement, if there was one.
    pub fn drop_replacement(&mut self) -> Option<Next> {
        self.next.take()
    }

    /// The live process of this slot, if any.
    pub fn pid(&self) -> Option<Pid> {
        match self.state {
            State::Running { pid, .. } | State::Stopping { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// True when the slot will never run again.
    pub fn is_over(&self) -> bool {
        matches!(self.state, State::Done { .. } | State::GivenUp { .. })
    }

    /// When the slot is due to start, if it is waiting.
    pub fn due(&self) -> Option<Instant> {
        match self.state {
            State::Waiting { at } => Some(at),
            _ => None,
        }
    }

    /// Verb `start`: the process was spawned; `ready` when nothing needs to report readiness.
    pub fn started(&mut self, pid: Pid, now: Instant, ready: bool) {
        if matches!(self.state, State::Done { .. } | State::GivenUp { .. }) {
            return;
        }
        self.state = State::Running {
            pid,
            since: now,
            ready,
        };
    }

    /// Verb `retry`: a start failed for corepool's own lack of resources (not the program's
    /// fault): try again at `at`, counting neither a restart nor a failure.
    pub fn retry_at(&mut self, at: Instant) {
        if matches!(self.state, State::Waiting { .. }) {
            self.state = State::Waiting { at };
        }
    }

    /// Verb `ready`: the process accepts connections. Returns how long it took, the first time.
    pub fn ready(&mut self, now: Instant) -> Option<Duration> {
        match &mut self.state {
            State::Running { ready, since, .. } if !*ready => {
                *ready = true;
                Some(now.saturating_duration_since(*since))
            }
            _ => None,
        }
    }

    /// Whether the slot's process is running and ready.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Running { ready: true, .. })
    }

    /// How long the slot's process has been up, if it is running and ready.
    pub fn serving_for(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Running {
                since, ready: true, ..
            } => Some(now.saturating_duration_since(since)),
            _ => None,
        }
    }

    /// A running process that has not become ready within `timeout`.
    pub fn unready_for(&self, timeout: Duration, now: Instant) -> Option<Pid> {
        match self.state {
            State::Running {
                pid,
                since,
                ready: false,
            } if now.saturating_duration_since(since) >= timeout => Some(pid),
            _ => None,
        }
    }

    /// Verb `stop`: the stop signal was sent to the group. A waiting slot is simply finished.
    pub fn stopping(&mut self) {
        self.state = match self.state {
            State::Running { pid, since, .. } => State::Stopping {
                pid,
                since,
                restart: false,
            },
            State::Waiting { .. } => State::Done { status: None },
            other => other,
        };
    }

    /// Verb `restart`: stop a process that never became ready, then start the slot again.
    pub fn restarting(&mut self) {
        if let State::Running { pid, since, .. } = self.state {
            self.state = State::Stopping {
                pid,
                since,
                restart: true,
            };
        }
    }

    /// Verb `promote`: the reload's replacement is ready and takes the slot. Returns the old
    /// process, which the pool must stop.
    pub fn promote(&mut self) -> Option<Pid> {
        let next = self.next.take()?;
        let old = self.pid();
        self.state = State::Running {
            pid: next.pid,
            since: next.since,
            ready: true,
        };
        old
    }

    /// Verb `take_over`: the old process died during its reload, so the replacement takes the
    /// slot before it is ready; it becomes ready (or is restarted after the ready timeout) like
    /// any new worker.
    pub fn take_over(&mut self) {
        if let Some(next) = self.next.take() {
            self.state = State::Running {
                pid: next.pid,
                since: next.since,
                ready: false,
            };
        }
    }

    /// Verb `start_failed`: spawning the slot's process failed after the pool had started
    /// others (the program vanished or became unusable since). It counts as a run that failed
    /// before it was ready, with `status` (126 or 127, as a shell would say).
    pub fn start_failed(
        &mut self,
        status: ExitStatus,
        now: Instant,
        rules: &RestartRules,
        pool_stopping: bool,
        fail_fast: bool,
    ) -> AfterExit {
        if !matches!(self.state, State::Waiting { .. }) {
            return AfterExit::Finished;
        }
        self.after_run(now, true, status, now, rules, pool_stopping, fail_fast)
    }

    /// Verb `exited`: the kernel reported the leader's exit. `pool_stopping` overrides the
    /// restart policy; `fail_fast` says the pool has never served and its start-up window is
    /// over, so a failure gives the slot up at once.
    pub fn exited(
        &mut self,
        status: ExitStatus,
        now: Instant,
        rules: &RestartRules,
        pool_stopping: bool,
        fail_fast: bool,
    ) -> AfterExit {
        let (since, forced) = match self.state {
            // An exit before the worker ever became ready is a failure, whatever its age: a
            // late timer must not make a crash at start look like a long life.
            State::Running { since, ready, .. } => (since, !ready),
            State::Stopping { restart: true, .. } if !pool_stopping => (now, true),
            State::Stopping { .. } => {
                self.state = State::Done {
                    status: Some(status),
                };
                return AfterExit::Finished;
            }
            _ => return AfterExit::Finished,
        };
        self.after_run(since, forced, status, now, rules, pool_stopping, fail_fast)
    }

    /// What follows a run that began at `since` and ended with `status` (`forced`: it counts
    /// as a failure whatever its age).
    #[allow(clippy::too_many_arguments)]
    fn after_run(
        &mut self,
        since: Instant,
        forced: bool,
        status: ExitStatus,
        now: Instant,
        rules: &RestartRules,
        pool_stopping: bool,
        fail_fast: bool,
    ) -> AfterExit {
        // A worker stopped for never becoming ready counts as a failure, whatever its age.
        let short_lived = forced || now.saturating_duration_since(since) < rules.min_uptime;
        self.failures = if short_lived { self.failures + 1 } else { 0 };
        let wanted = matches!(self.state, State::Stopping { restart: true, .. })
            || match rules.policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !status.success(),
                RestartPolicy::Never => false,
            };
        if pool_stopping || !wanted {
            self.state = State::Done {
                status: Some(status),
            };
            return AfterExit::Finished;
        }
        if (short_lived && fail_fast)
            || (rules.max_restarts > 0 && self.failures >= rules.max_restarts)
        {
            self.state = State::GivenUp { status };
            return AfterExit::GaveUp;
        }
        let at = now + rules.backoff(self.failures);
        self.restarts += 1;
        self.state = State::Waiting { at };
        AfterExit::RestartAt(at)
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
