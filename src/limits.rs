//! Limits: corepool's descriptor budget, and the one its workers get back.
//!
//! A relayed connection (`--balance proxy`) costs corepool six descriptors: the client's
//! socket, the worker's, and a pipe (two ends) for each direction. The usual soft
//! `RLIMIT_NOFILE` of 1024 would run out at about 170 connections, and then corepool itself
//! could no longer answer `/healthz` or start a worker. So at start corepool raises its soft
//! limit to the hard limit ([`raise_nofile`]), as nginx's `worker_rlimit_nofile` or systemd do
//! for a service, and remembers the soft limit it was given. Each worker gets that one back
//! before exec ([`restore_for_exec`]): a program sees the limit it would have had without
//! corepool (some still use select(2), which breaks on descriptors past 1024).
//!
//! [`auto_max_connections`] is the default of `--max-connections`: as many relays as the raised
//! limit holds once a reserve for corepool's own descriptors is set aside.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors of one relayed connection: two sockets, two pipes of two ends each.
pub const PER_RELAY: u64 = 6;

/// Descriptors kept for corepool itself whatever the worker count: the runtime (epoll,
/// eventfd), stdio, the signal pipe, the metrics and control listeners and their connections,
/// the notify socket, a worker start's transient pipes, the readiness probes, the client each
/// proxy relay thread holds while the relays are at `--max-connections`.
pub const RESERVE_BASE: u64 = 64;

/// Descriptors kept per worker slot: its stdout and stderr pipes, twice (a reload runs old and
/// new side by side), and a probe connection.
pub const RESERVE_PER_WORKER: u64 = 8;

/// The soft limit corepool was started with, for its workers; `u64::MAX` while unchanged.
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);
/// The hard limit (unchanged by corepool), written back with the soft one.
static HARD: AtomicU64 = AtomicU64::new(u64::MAX);

/// What [`raise_nofile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit corepool was given (and its workers keep).
    pub before: u64,
    /// corepool's soft limit now.
    pub now: u64,
    pub hard: u64,
}

fn get() -> io::Result<libc::rlimit> {
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    Ok(libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    })
}

fn set(soft: u64, hard: u64) -> io::Result<()> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)?;
    Ok(())
}

/// The soft descriptor limit now.
pub fn nofile() -> io::Result<u64> {
    Ok(get()?.rlim_cur as u64)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `fs.nr_open` when the hard limit is
/// unlimited, since the kernel refuses more), and records the old soft limit for the workers.
/// Call once, before any worker starts.
pub fn raise_nofile() -> io::Result<Nofile> {
    let limit = get()?;
    let (before, hard) = (limit.rlim_cur as u64, limit.rlim_max as u64);
    let mut target = hard;
    if limit.rlim_max == libc::RLIM_INFINITY {
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target <= before {
        return Ok(Nofile {
            before,
            now: before,
            hard,
        });
    }
    set(target, hard)?;
    HARD.store(hard, Ordering::Relaxed);
    ORIGINAL_SOFT.store(before, Ordering::Relaxed);
    Ok(Nofile {
        before,
        now: target,
        hard,
    })
}

/// In a freshly forked worker, before exec: puts back the soft limit corepool was started
/// with. Async-signal-safe (two atomic loads and setrlimit(2)); lowering the soft limit under
/// the unchanged hard one cannot fail, so there is nothing to report.
pub fn restore_for_exec() {
    let soft = ORIGINAL_SOFT.load(Ordering::Relaxed);
    if soft == u64::MAX {
        return;
    }
    // A plain system call on a stack value: async-signal-safe, as `launch` needs.
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        soft as libc::rlim_t,
        HARD.load(Ordering::Relaxed) as libc::rlim_t,
    );
}

/// The descriptors corepool keeps for itself with `workers` worker slots.
pub fn reserve(workers: usize) -> u64 {
    RESERVE_BASE + RESERVE_PER_WORKER * workers as u64
}

/// The default `--max-connections`: the relays a descriptor limit of `nofile` holds once
/// corepool's own reserve is set aside; at least 1.
pub fn auto_max_connections(nofile: u64, workers: usize) -> usize {
    let relays = nofile.saturating_sub(reserve(workers)) / PER_RELAY;
    usize::try_from(relays).unwrap_or(usize::MAX).max(1)
}

/// `--max-connections auto` for the whole container: the relays the descriptor limit holds
/// beside corepool's reserve for the workers of every pool, less what the pools with a fixed
/// `--max-connections` may run, split evenly among the proxy pools set to `auto`. It follows
/// the worker count ([`RelayBudget::follow`]): a scale up grows the reserve and leaves fewer
/// relays, so that corepool is never the process that runs out of descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayBudget {
    pub nofile: u64,
    /// Relays the pools with a fixed `--max-connections` may run together.
    pub fixed: usize,
    /// Proxy pools set to `auto`, among which the rest is split.
    pub auto_pools: usize,
    /// Worker slots of every pool, as last followed.
    pub workers: usize,
}

impl RelayBudget {
    /// Each `auto` pool's connection limit now (at least 1).
    pub fn share(&self) -> usize {
        let relays = self.nofile.saturating_sub(reserve(self.workers)) / PER_RELAY;
        let left = relays.saturating_sub(self.fixed as u64);
        let each = left / self.auto_pools.max(1) as u64;
        usize::try_from(each).unwrap_or(usize::MAX).max(1)
    }

    /// The pools now have `workers` slots in all: the new share, if that changed it.
    pub fn follow(&mut self, workers: usize) -> Option<usize> {
        let was = self.share();
        self.workers = workers;
        let now = self.share();
        (now != was).then_some(now)
    }
}

/// The descriptors `max_connections` relays need on top of corepool's reserve.
pub fn needed(max_connections: usize, workers: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(PER_RELAY)
        .saturating_add(reserve(workers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_leaves_the_reserve() {
        // 1024 descriptors, 2 workers: (1024 - 64 - 16) / 6.
        assert_eq!(auto_max_connections(1024, 2), 157);
        assert_eq!(auto_max_connections(1 << 20, 4), ((1 << 20) - 96) / 6);
        assert_eq!(auto_max_connections(10, 2), 1);
        assert!(needed(157, 2) <= 1024);
        assert!(needed(158, 2) > 1024);
    }

    #[test]
    fn the_budget_is_the_containers_and_follows_the_worker_count() {
        let mut budget = RelayBudget {
            nofile: 1024,
            fixed: 0,
            auto_pools: 1,
            workers: 2,
        };
        assert_eq!(budget.share(), auto_max_connections(1024, 2));
        // Two proxy pools of 2 workers each: the reserve of 4, the rest halved.
        budget.auto_pools = 2;
        budget.workers = 4;
        assert_eq!(budget.share(), (1024 - 64 - 32) / 6 / 2);
        // A pool with a fixed limit of 100 takes its part first.
        budget.fixed = 100;
        assert_eq!(budget.share(), ((1024 - 64 - 32) / 6 - 100) / 2);
        // A scale to 20 workers in all: fewer relays; back to 4: as before; unchanged: None.
        assert_eq!(budget.follow(20), Some(((1024 - 64 - 160) / 6 - 100) / 2));
        assert_eq!(budget.follow(4), Some(((1024 - 64 - 32) / 6 - 100) / 2));
        assert_eq!(budget.follow(4), None);
        // Never below one relay each.
        budget.fixed = 10_000;
        assert_eq!(budget.share(), 1);
    }
}
