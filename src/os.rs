//! The supervisor's edge with the operating system: signalling, liveness, reaping, the list of
//! our children and group usage, behind one small trait.
//!
//! [`RealOs`] does it with kill(2), waitpid(2) (through the reaper, the only waiter) and /proc;
//! [`fake::FakeOs`] (tests only) records the signals and answers from a table, so that the
//! decisions of the core (drains, the ending) are unit-tested without processes.

use crate::balance::Balancer;
use crate::launch::LaunchSpec;
use crate::logs::{Output, PumpHandle, Stream};
use crate::metrics::{Usage, group_usage};
use crate::reaper::{self, Exit};
use crate::reserve;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

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
    /// Starts a worker process for `slot` (of `instances`) with its share of the port, in a
    /// process group of its own.
    fn spawn(&mut self, slot: usize, instances: usize) -> std::io::Result<Pid>;
    /// Routing: the worker `pid` accepts connections.
    fn route_ready(&mut self, pid: Pid);
    /// Routing: the worker `pid` is stopping: send it nothing new.
    fn unroute(&mut self, pid: Pid);
    /// Routing: the worker `pid` exited.
    fn route_exited(&mut self, pid: Pid);
    /// Routing: `slot` is given up for good.
    fn abandon(&mut self, slot: usize);
    /// Routing: the pool now has `slots` slots (a scale): socket mode adds a socket for each
    /// new slot, and closes a removed slot's once its process is gone.
    fn resize(&mut self, slots: usize) -> std::io::Result<()>;
    /// Routing: the pool stops; accept nothing more.
    fn close(&mut self);
}

/// A direct child of corepool, as the stray sweep sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    pub pid: Pid,
    pub pgid: Option<Pid>,
    pub zombie: bool,
}

/// The operating system itself, with the launcher, the balancer and the output pumps that a
/// worker start and the routing go through (one per pool; the output is the container's).
pub struct RealOs {
    pub launch: LaunchSpec,
    pub balancer: Balancer,
    pub output: Rc<Output>,
    pub pumps: Vec<PumpHandle>,
    /// The workers started for each slot that have not exited yet (group leaders): a new one
    /// for a slot is told them as its predecessors (`COREPOOL_REPLACES`).
    pub started: HashMap<usize, Vec<i32>>,
    pub owners: Owners,
    /// The pool's name in its workers' log lines (empty for the single unnamed pool).
    pub pool: String,
}

/// Which pool started which process group, when several pools share the container: a pool's
/// stray sweep (its stop) must leave the other pools' workers alone. Entries whose group is
/// gone are dropped at each claim, so the table holds at most the live groups.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    /// This pool's index.
    pub me: usize,
    table: Rc<RefCell<HashMap<i32, usize>>>,
}

impl Owners {
    /// The registry of pool `me`, sharing `other`'s table (`other`: any pool's registry).
    pub fn join(other: &Owners, me: usize) -> Owners {
        Owners {
            me,
            table: other.table.clone(),
        }
    }

    /// This pool started the process group `pgid`.
    fn claim(&self, pgid: i32) {
        let mut table = self.table.borrow_mut();
        table.retain(|&g, _| !matches!(kill(Pid::from_raw(-g), None), Err(Errno::ESRCH)));
        table.insert(pgid, self.me);
    }

    /// `pid` (or its group `pgid`) belongs to another pool.
    fn foreign(&self, pid: Pid, pgid: Option<Pid>) -> bool {
        let table = self.table.borrow();
        [Some(pid), pgid].into_iter().flatten().any(|p| {
            table
                .get(&p.as_raw())
                .is_some_and(|&owner| owner != self.me)
        })
    }
}

impl RealOs {
    /// `spawn` once, without the descriptor reserve.
    fn spawn_once(&mut self, slot: usize, instances: usize) -> std::io::Result<Pid> {
        let mut handover = self.balancer.handover(slot, instances)?;
        // A replacement (reload, memory) starts while the worker it replaces still runs, and
        // may ask for the same port outside corepool's list (pm2's `base + NODE_APP_INSTANCE`
        // admin port): the preload waits for these process groups to let go of it.
        let predecessors = self.started.get(&slot).cloned().unwrap_or_default();
        let replaces = predecessors
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        handover.io.env.push(("COREPOOL_REPLACES".into(), replaces));
        let launched = self.launch.launch(&handover.io)?;
        let pid = launched.pid.as_raw();
        self.started.entry(slot).or_default().push(pid);
        self.balancer.watch(handover, pid);
        self.owners.claim(pid);
        self.pumps.push(self.output.pump_in(
            &self.pool,
            launched.stdout,
            Stream::Stdout,
            slot,
            pid,
        ));
        self.pumps.push(self.output.pump_in(
            &self.pool,
            launched.stderr,
            Stream::Stderr,
            slot,
            pid,
        ));
        self.pumps.retain(|p| !p.is_finished());
        Ok(launched.pid)
    }
}

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
            .filter(|child| !self.owners.foreign(child.pid, child.pgid))
            .collect()
    }

    fn usage(&self, groups: &[i32]) -> HashMap<i32, Usage> {
        group_usage(groups)
    }

    /// Launches, and once more with the descriptor reserve released if the table was full.
    fn spawn(&mut self, slot: usize, instances: usize) -> std::io::Result<Pid> {
        let result = match self.spawn_once(slot, instances) {
            Err(err) if reserve::is_fd_shortage(&err) => {
                let freed = reserve::release();
                tracing::warn!(
                    "worker {slot}: no descriptor left ({err}): using the {freed} held in reserve"
                );
                self.spawn_once(slot, instances)
            }
            other => other,
        };
        reserve::refill();
        result
    }

    fn route_ready(&mut self, pid: Pid) {
        self.balancer.worker_ready(pid.as_raw());
    }

    fn unroute(&mut self, pid: Pid) {
        self.balancer.forget(pid.as_raw());
    }

    fn route_exited(&mut self, pid: Pid) {
        // A slot a scale removed keeps its entry while its processes live: a new worker of
        // that slot number (a scale up again) waits for them; then the entry goes.
        self.started.retain(|_, pids| {
            pids.retain(|&p| p != pid.as_raw());
            !pids.is_empty()
        });
        self.balancer.exited(pid.as_raw());
    }

    fn abandon(&mut self, slot: usize) {
        self.balancer.abandon(slot);
    }

    fn resize(&mut self, slots: usize) -> std::io::Result<()> {
        self.balancer.resize(slots)
    }

    fn close(&mut self) {
        self.balancer.close();
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
        /// The next pid a spawn returns.
        pub next_pid: i32,
        /// Spawns, in order: (slot, pid).
        pub spawned: Vec<(usize, Pid)>,
        /// The next spawns fail with these errors, in order.
        pub spawn_errors: Vec<std::io::Error>,
        /// Routing calls, in order, as words.
        pub routing: Vec<String>,
    }

    impl FakeOs {
        /// The target is gone (its group emptied, the process reaped).
        pub fn vanish(&mut self, target: Target) {
            self.gone.insert(target);
        }

        /// The process `pid` exits with `status`: the next reap reports it, and its group is
        /// gone.
        pub fn exit(&mut self, pid: Pid, status: crate::reaper::ExitStatus) {
            self.exits.push(Exit { pid, status });
            self.gone.insert(Target::Group(pid));
            self.gone.insert(Target::Process(pid));
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
                .filter_map(|g| self.usage.get(g).map(|u| (*g, *u)))
                .collect()
        }
        fn spawn(&mut self, slot: usize, _instances: usize) -> std::io::Result<Pid> {
            if !self.spawn_errors.is_empty() {
                return Err(self.spawn_errors.remove(0));
            }
            self.next_pid = self.next_pid.max(100) + 1;
            let pid = Pid::from_raw(self.next_pid);
            self.spawned.push((slot, pid));
            Ok(pid)
        }
        fn route_ready(&mut self, pid: Pid) {
            self.routing.push(format!("ready {pid}"));
        }
        fn unroute(&mut self, pid: Pid) {
            self.routing.push(format!("forget {pid}"));
        }
        fn route_exited(&mut self, pid: Pid) {
            self.routing.push(format!("exited {pid}"));
        }
        fn abandon(&mut self, slot: usize) {
            self.routing.push(format!("abandon {slot}"));
        }
        fn resize(&mut self, slots: usize) -> std::io::Result<()> {
            self.routing.push(format!("resize {slots}"));
            Ok(())
        }
        fn close(&mut self) {
            self.routing.push("close".into());
        }
    }
}
