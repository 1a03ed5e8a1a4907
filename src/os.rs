//! The supervisor's edge with the operating system: signalling, liveness, reaping, the list of
//! our children and group usage, behind one small trait.
//!
//! [`RealOs`] does it with kill(2), waitpid(2) (through the reaper, the only waiter) and /proc;
//! [`fake::FakeOs`] (tests only) records the signals and answers from a table, so that the
//! decisions of the core (drains, the ending) are unit-tested without processes.

use crate::metrics::{Usage, group_usage};
use crate::reaper::{self, Exit};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::HashMap;

/// Something corepool signals and waits to see gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A worker's process group (`kill(-pgid)`).
    Group(Pid),
    /// A lone process that left its group (setsid) but is still our child.
    Process(Pid),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Group(pgid) => write!(f, "process group {pgid}"),
            Target::Process(pid) => write!(f, "process {pid}"),
        }
    }
}

impl Target {
    /// The pid argument of kill(2) that reaches this target.
    fn raw(self) -> Pid {
        match self {
            Target::Group(pgid) => Pid::from_raw(-pgid.as_raw()),
            Target::Process(pid) => pid,
        }
    }
}

/// What the supervision core asks of the operating system.
pub trait Os {
    /// Sends `sig` to `target`; a target already gone is not an error.
    fn signal(&mut self, target: Target, sig: Signal);
    /// Sends a signal by its raw number (real-time ones included).
    fn signal_raw(&mut self, target: Target, signo: i32);
    /// Whether anything is left to signal (zombies count until reaped).
    fn alive(&self, target: Target) -> bool;
    /// Collects every exited child (the only waiter of the process).
    fn reap(&mut self) -> Vec<Exit>;
    /// Our direct children, with whether each is a zombie and its process group.
    fn children(&self) -> Vec<Child>;
    /// Resident memory and CPU of each process group.
    fn usage(&self, groups: &[i32]) -> HashMap<i32, Usage>;
}

/// A direct child of corepool, as the stray sweep sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    pub pid: Pid,
    pub pgid: Option<Pid>,
    pub zombie: bool,
}

/// The operating system itself.
#[derive(Debug, Default)]
pub struct RealOs;

impl Os for RealOs {
    fn signal(&mut self, target: Target, sig: Signal) {
        match kill(target.raw(), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => tracing::warn!("kill({}, {sig}) failed: {err}", target.raw()),
        }
    }

    fn signal_raw(&mut self, target: Target, signo: i32) {
        // SAFETY: kill(2) has no memory effects.
        if unsafe { libc::kill(target.raw().as_raw(), signo) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(
                    "kill({}, {}) failed: {err}",
                    target.raw(),
                    reaper::signal_name(signo)
                );
            }
        }
    }

    fn alive(&self, target: Target) -> bool {
        !matches!(kill(target.raw(), None), Err(Errno::ESRCH))
    }

    fn reap(&mut self) -> Vec<Exit> {
        reaper::reap_all()
    }

    fn children(&self) -> Vec<Child> {
        reaper::direct_children()
            .into_iter()
            .map(|pid| Child {
                pid,
                pgid: nix::unistd::getpgid(Some(pid)).ok(),
                zombie: is_zombie(pid),
            })
            .collect()
    }

    fn usage(&self, groups: &[i32]) -> HashMap<i32, Usage> {
        group_usage(groups)
    }
}

fn is_zombie(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().next().map(|s| s == "Z")
        })
        .unwrap_or(false)
}

#[cfg(test)]
pub mod fake {
    //! A pretend operating system for unit tests, in the spirit of watchexec-supervisor's
    //! `TestChild`: targets are alive until the test says otherwise, signals are recorded.

    use super::*;
    use std::collections::HashSet;

    #[derive(Debug, Default)]
    pub struct FakeOs {
        /// Every signal sent, in order (raw ones as their number).
        pub sent: Vec<(Target, i32)>,
        /// Targets that are gone.
        pub gone: HashSet<Target>,
        /// Exits the next reap returns.
        pub exits: Vec<Exit>,
        pub children: Vec<Child>,
        pub usage: HashMap<i32, Usage>,
    }

    impl FakeOs {
        /// The target is gone (its group emptied, the process reaped).
        pub fn vanish(&mut self, target: Target) {
            self.gone.insert(target);
        }

        /// The signals `target` received.
        pub fn signals_to(&self, target: Target) -> Vec<i32> {
            self.sent
                .iter()
                .filter(|(t, _)| *t == target)
                .map(|&(_, s)| s)
                .collect()
        }
    }

    impl Os for FakeOs {
        fn signal(&mut self, target: Target, sig: Signal) {
            self.sent.push((target, sig as i32));
        }
        fn signal_raw(&mut self, target: Target, signo: i32) {
            self.sent.push((target, signo));
        }
        fn alive(&self, target: Target) -> bool {
            !self.gone.contains(&target)
        }
        fn reap(&mut self) -> Vec<Exit> {
            std::mem::take(&mut self.exits)
        }
        fn children(&self) -> Vec<Child> {
            self.children.clone()
        }
        fn usage(&self, groups: &[i32]) -> HashMap<i32, Usage> {
            groups
                .iter()
                .filter_map(|g| self.usage.get(g).map(|u| (*g, u.clone())))
                .collect()
        }
    }
}
