//! The reaper: the one and only place in corepool that collects exit statuses.
//!
//! As PID 1 (or as a child subreaper when not PID 1) corepool inherits every orphan in the
//! container. SIGCHLDs coalesce, so the sender of a SIGCHLD says nothing about who exited: on
//! every wake-up of the supervisor loop we call `waitpid(-1, WNOHANG)` until it reports no more
//! exited children, and hand the statuses to the pool. Nothing else in the program may wait for a
//! child (no `tokio::process`, no `std::process::Child::wait`), or statuses would be stolen.

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::fmt;

/// How a process ended, as a shell would report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signaled(Signal),
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig as i32,
        }
    }

    /// True for `exit(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled(sig) => write!(f, "signal {sig} ({})", 128 + *sig as i32),
        }
    }
}

/// One child that has exited and been reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: Pid,
    pub status: ExitStatus,
}

/// Reaps every child that has exited so far, without blocking.
///
/// Loops on `waitpid(-1, WNOHANG)` until it returns 0 (children remain, none exited) or ECHILD
/// (no children at all). EINTR is retried; any other error is logged and ends this round (the
/// next wake-up, at the latest the one-second safety tick, tries again).
pub fn reap_all() -> Vec<Exit> {
    let mut exits = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exits.push(Exit {
                pid,
                status: ExitStatus::Code(code),
            }),
            Ok(WaitStatus::Signaled(pid, sig, _core)) => exits.push(Exit {
                pid,
                status: ExitStatus::Signaled(sig),
            }),
            Ok(WaitStatus::StillAlive) => break,
            // Stopped/continued are not reported without WUNTRACED/WCONTINUED; ignore if seen.
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => break,
            Err(err) => {
                tracing::warn!("waitpid(-1) failed: {err}");
                break;
            }
        }
    }
    exits
}

/// Makes orphaned descendants come to us when we are not PID 1 (in a pid namespace the kernel
/// already re-parents them to PID 1). Returns what was done, for the start-up log.
pub fn adopt_orphans() -> &'static str {
    if std::process::id() == 1 {
        return "running as PID 1";
    }
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => "child subreaper (not PID 1)",
        Err(err) => {
            tracing::warn!(
                "prctl(PR_SET_CHILD_SUBREAPER) failed: {err}; orphans will not be reaped by corepool"
            );
            "not PID 1, subreaper unavailable"
        }
    }
}

/// Direct children of this process, from /proc/self/task/*/children (every thread, since a
/// child's parent is the thread that forked it). Used for the final sweep of processes that left
/// their worker's process group (setsid) and so cannot be reached with `kill(-pgid)`.
pub fn direct_children() -> Vec<Pid> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        pids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .map(Pid::from_raw),
        );
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signaled(Signal::SIGKILL).shell_code(), 137);
        assert_eq!(ExitStatus::Signaled(Signal::SIGTERM).shell_code(), 143);
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signaled(Signal::SIGTERM).success());
    }
}
