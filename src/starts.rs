//! Starting workers: which due slots may start now, and the start itself.
//!
//! `--start-concurrency` bounds the workers spawned and not yet ready at once: the other due
//! starts queue, earliest due first, and start as others become ready or exit (the queue is
//! told once each time it forms). A start that fails means the command cannot run at all
//! (before any worker process was started), corepool's own lack of resources (tried again
//! later, not a failure of the worker), or a crash of the slot. The supervisor asks this type
//! and applies its answers (ending the pool, restarting the slot).

use crate::exit;
use crate::os::Os;
use crate::reserve;
use crate::slots::Slots;
use crate::units::format_duration as human;
use std::time::{Duration, Instant};

/// A start that failed for corepool's own lack of resources is tried again after this long.
const RESOURCE_RETRY: Duration = Duration::from_secs(1);

/// The due-start queue, the concurrency bound, and whether any worker was started yet.
#[derive(Debug)]
pub struct Starts {
    /// Workers spawned but not yet ready at once (0: no bound).
    concurrency: usize,
    /// A worker must report readiness (else it is ready once started, and takes no room).
    needs_ready: bool,
    /// The program, for messages.
    program: String,
    /// Some worker process has been started: from then on a start that fails is a crash of
    /// that slot (restarted with backoff); before, it is the command that cannot run at all.
    launched_once: bool,
    /// The queue length at the last turn (0 once it is empty), so that a queue is told once,
    /// not at every turn.
    queue_logged: usize,
}

/// What became of one start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The worker runs; `unready`: it takes room until it is ready.
    Spawned { unready: bool },
    /// corepool was short of resources: the slot tries again shortly.
    Retrying,
    /// No worker ever started and this one cannot either: the pool dies with this code.
    CannotRun(i32),
    /// The slot's start failed (it started before): a failed run, with this exit code.
    Failed(i32),
}

impl Starts {
    pub fn new(concurrency: usize, needs_ready: bool, program: String) -> Starts {
        Starts {
            concurrency,
            needs_ready,
            program,
            launched_once: false,
            queue_logged: 0,
        }
    }

    /// The slots whose time has come at `now`, earliest due first.
    pub fn due(&self, slots: &Slots, now: Instant) -> Vec<usize> {
        let mut due: Vec<(Instant, usize)> = (0..slots.len())
            .filter_map(|i| Some((slots.worker(i).due()?, i)))
            .filter(|&(at, _)| at <= now)
            .collect();
        due.sort_unstable();
        due.into_iter().map(|(_, i)| i).collect()
    }

    /// How many more workers may be spawned now (`usize::MAX`: no bound).
    pub fn room(&self, slots: &Slots) -> usize {
        if self.concurrency == 0 || !self.needs_ready {
            return usize::MAX;
        }
        self.concurrency.saturating_sub(slots.unready())
    }

    /// Says how many due workers wait for a start, once each time a queue forms.
    pub fn queued(&mut self, queued: usize) {
        if self.queue_logged == 0 {
            tracing::info!(
                "{queued} workers queued: at most {} start at once (--start-concurrency); each \
                 starts as another becomes ready or exits",
                self.concurrency
            );
        }
        self.queue_logged = queued;
    }

    /// Every due worker started: a next queue is told again.
    pub fn queue_empty(&mut self) {
        self.queue_logged = 0;
    }

    /// Spawns slot `i`'s worker.
    pub fn start(&mut self, slots: &mut Slots, i: usize, now: Instant, os: &mut dyn Os) -> Start {
        let slot = slots.worker(i).slot();
        let err = match os.spawn(slot, slots.len()) {
            Ok(pid) => {
                self.launched_once = true;
                slots.started(i, pid, now, !self.needs_ready);
                tracing::info!("worker {slot} started, pid {pid}");
                return Start::Spawned {
                    unready: self.needs_ready,
                };
            }
            Err(err) => err,
        };
        let program = &self.program;
        let code = start_error_code(&err);
        if !self.launched_once {
            let hint = cannot_run_hint(&err);
            tracing::error!("cannot run {program}: {err}{hint}");
            return Start::CannotRun(code);
        }
        if reserve::is_resource_shortage(&err) {
            // corepool's trouble, not the program's: not a crash of the slot.
            tracing::error!(
                "worker {slot}: cannot start {program}: {err} (corepool is short of \
                 resources; not counted as a failure of the worker): retrying in {}",
                human(RESOURCE_RETRY)
            );
            slots.worker_mut(i).retry_at(now + RESOURCE_RETRY);
            return Start::Retrying;
        }
        // It started before: it vanished or became unusable since.
        tracing::error!("worker {slot}: cannot start {program}: {err}");
        Start::Failed(code)
    }
}

/// What is missing when a first start fails, if the error says.
fn cannot_run_hint(err: &std::io::Error) -> &'static str {
    // The file exists and is executable (checked before), so ENOENT from execve means what it
    // names to run it is missing.
    match err.raw_os_error() {
        Some(libc::ENOENT) => " (its #! interpreter or ELF loader does not exist)",
        Some(libc::ENOEXEC) => " (neither a binary for this machine nor a #! script)",
        _ => "",
    }
}

/// The exit code a failed start stands for, as a shell would say it.
fn start_error_code(err: &std::io::Error) -> i32 {
    match (err.kind(), err.raw_os_error()) {
        (std::io::ErrorKind::NotFound, _) => exit::NOT_FOUND,
        (std::io::ErrorKind::PermissionDenied, _) => exit::NOT_EXECUTABLE,
        (_, Some(libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY)) => exit::NOT_EXECUTABLE,
        // fork or pipe failures (EAGAIN, EMFILE): corepool's own trouble.
        _ => exit::STARTUP,
    }
}
