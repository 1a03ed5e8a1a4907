//! The reaper: the one and only place in corepool that collects exit statuses.
//!
//! As PID 1 (or as a child subreaper when not PID 1) corepool inherits every orphan in the
//! container. SIGCHLDs coalesce, so the sender of a SIGCHLD says nothing about who exited: on
//! every wake-up of the supervisor loop we call `waitpid(-1, WNOHANG)` until it reports no more
//! exited children, and hand the statuses to the pool. Nothing else in the program may wait for a
//! child (no `tokio::process`, no `std::process::Child::wait`), or statuses would be stolen.

use nix::unistd::Pid;
use std::fmt;

/// How a process ended, as a shell would report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal: its raw number, real-time signals (SIGRTMIN..SIGRTMAX) included,
    /// which `nix::sys::signal::Signal` cannot represent.
    Signaled(i32),
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig,
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
            ExitStatus::Signaled(sig) => write!(f, "signal {} ({})", signal_name(*sig), 128 + sig),
        }
    }
}

/// A signal's name: `SIGTERM`; `SIGRTMIN`, `SIGRTMIN+6`, `SIGRTMAX` for real-time ones; the
/// bare number for one without a name (32 and 33, which the C library keeps for itself).
pub fn signal_name(signo: i32) -> String {
    let (rtmin, rtmax) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    if signo == rtmin {
        return "SIGRTMIN".into();
    }
    if signo == rtmax {
        return "SIGRTMAX".into();
    }
    if (rtmin..rtmax).contains(&signo) {
        return format!("SIGRTMIN+{}", signo - rtmin);
    }
    match nix::sys::signal::Signal::try_from(signo) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) => signo.to_string(),
    }
}

/// Decodes a raw wait status. Only exits and deaths by a signal are asked for (no WUNTRACED or
/// WCONTINUED), but whatever else comes is returned as `None`, never misread.
fn decode(status: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signaled(libc::WTERMSIG(status)))
    } else {
        None
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
/// next wake-up, at the latest the one-second safety tick, tries again). The raw status is
/// decoded here with the C macros, so that no status is lost to a decoder that does not know a
/// signal (a worker killed by a real-time signal, say).
pub fn reap_all() -> Vec<Exit> {
    let mut exits = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one int through a valid pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            match decode(status) {
                Some(status) => exits.push(Exit {
                    pid: Pid::from_raw(pid),
                    status,
                }),
                // Stopped/continued are not reported without WUNTRACED/WCONTINUED.
                None => tracing::debug!("pid {pid}: wait status {status:#x} ignored"),
            }
            continue;
        }
        if pid == 0 {
            break;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => break,
            _ => {
                tracing::warn!("waitpid(-1) failed: {}", std::io::Error::last_os_error());
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
        assert_eq!(ExitStatus::Signaled(libc::SIGKILL).shell_code(), 137);
        assert_eq!(ExitStatus::Signaled(libc::SIGTERM).shell_code(), 143);
        assert_eq!(ExitStatus::Signaled(64).shell_code(), 192);
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signaled(libc::SIGTERM).success());
    }

    #[test]
    fn names_signals() {
        assert_eq!(
            ExitStatus::Signaled(libc::SIGTERM).to_string(),
            "signal SIGTERM (143)"
        );
        let rtmin = libc::SIGRTMIN();
        assert_eq!(
            ExitStatus::Signaled(rtmin + 6).to_string(),
            format!("signal SIGRTMIN+6 ({})", 128 + rtmin + 6)
        );
        assert_eq!(signal_name(rtmin), "SIGRTMIN");
        assert_eq!(signal_name(libc::SIGRTMAX()), "SIGRTMAX");
        assert_eq!(signal_name(32), "32");
    }

    #[test]
    fn decodes_raw_statuses() {
        // Built the way the kernel builds them: code << 8, or the signal number (0x80 = core).
        assert_eq!(decode(42 << 8), Some(ExitStatus::Code(42)));
        assert_eq!(decode(34), Some(ExitStatus::Signaled(34)));
        assert_eq!(decode(64 | 0x80), Some(ExitStatus::Signaled(64)));
        assert_eq!(decode(0x7f | (libc::SIGSTOP << 8)), None);
        assert_eq!(decode(0xffff), None);
    }
}
