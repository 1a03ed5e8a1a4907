//! Metrics: what the pool looks like from outside, for Prometheus, Kubernetes probes and
//! `corepool status`.
//!
//! The supervisor loop publishes a [`Snapshot`] of its slots after every turn (cheap: N small
//! records under a mutex). Everything that reports reads the snapshot and never touches the pool:
//! the HTTP endpoint of `--metrics ADDR` (`/metrics` in the Prometheus text format, `/healthz`,
//! `/readyz`), the control socket's `status`, and the memory watch. Memory and CPU are those of a
//! worker's whole process group, summed from /proc at the time of asking; /metrics reuses a
//! reading for `USAGE_CACHE`, so that a flood of scrapes cannot keep the supervisor's thread
//! busy scanning /proc (/healthz and /readyz only read the snapshot).
//!
//! The HTTP listener is bounded: `MAX_CONNECTIONS` open at once (past that, the connection that
//! has waited longest for its request is closed), `REQUEST_TIMEOUT` to send a request head of at
//! most 8 KiB and again to take the answer.

//!
//! Layout: this module holds the snapshot and its readers' shared state ([`Shared`]) and
//! the /proc usage scan; `render` the Prometheus text exposition; `server` the bounded HTTP
//! listener and its probes.

pub mod health;
mod render;
mod server;

pub use render::render;
pub use server::{MAX_CONNECTIONS, REQUEST_TIMEOUT, bind, serve};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The supervisor loop is considered alive while it published within this long (it wakes at
/// least once a second).
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(5);
/// Process-group usage read from /proc is reused for this long by /metrics.
pub const USAGE_CACHE: Duration = Duration::from_secs(1);

/// One slot as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    pub slot: usize,
    pub pid: Option<i32>,
    /// waiting, running, stopping, done, given-up.
    pub state: &'static str,
    pub ready: bool,
    pub restarts: u64,
    /// How long the current process has run.
    pub uptime: Option<Duration>,
}

/// The pool as last published by the supervisor loop.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub heartbeat: Instant,
    pub slots: Vec<SlotView>,
    /// A stop (or the shutdown delay before it) is under way: not ready.
    pub stopping: bool,
    pub reloads: u64,
    pub memory_restarts: u64,
    pub open_connections: Option<usize>,
    pub connections_total: Option<u64>,
    /// Proxy mode: requests sent to another worker, theirs gone without reading them.
    pub connections_resent: Option<u64>,
    /// Proxy mode: `--max-connections`, and the times the accept loop stopped at it.
    pub connection_limit: Option<(usize, u64)>,
    /// Several pools (`[pool.NAME]`): each, in order, owning the next `slots` of `slots`.
    /// Empty for the single unnamed pool (no `pool` label anywhere).
    pub pools: Vec<PoolView>,
    /// A manual `corepool scale` pinned the worker count (of any pool).
    pub pinned: bool,
    /// Processes on their way out (not slots: a slot's current process is in `slots`).
    pub leaving: Vec<LeavingView>,
}

/// A process leaving its pool, as reported until it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeavingView {
    /// Its pool's name ("" for the single unnamed pool).
    pub pool: String,
    /// The slot it served.
    pub slot: usize,
    pub pid: i32,
    /// "retiring" (replaced by a reload) or "removed" (its slot removed by a scale).
    pub state: &'static str,
}

/// One pool of several, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    pub balance: &'static str,
    /// waiting, running, stopping, finished (a oneshot pool done with 0), done.
    pub state: &'static str,
    /// How many of the snapshot's slots are this pool's (they follow the previous pool's).
    pub slots: usize,
    pub min_ready: usize,
    /// A manual `corepool scale` pinned this pool's worker count.
    pub pinned: bool,
}

impl Snapshot {
    /// Nothing published yet, or the start of a new publication: no slot, no pool, no count.
    pub fn empty(heartbeat: Instant) -> Snapshot {
        Snapshot {
            heartbeat,
            slots: Vec::new(),
            stopping: false,
            reloads: 0,
            memory_restarts: 0,
            open_connections: None,
            connections_total: None,
            connections_resent: None,
            connection_limit: None,
            pools: Vec::new(),
            pinned: false,
            leaving: Vec::new(),
        }
    }

    /// Each slot with the name of its pool ("" for the single unnamed pool).
    pub fn slots_by_pool(&self) -> Vec<(&str, &SlotView)> {
        if self.pools.is_empty() {
            return self.slots.iter().map(|s| ("", s)).collect();
        }
        let names = self
            .pools
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.name.as_str(), p.slots));
        names.zip(&self.slots).collect()
    }
}

/// Usage of some process groups, and when it was read.
type UsageScan = (Instant, Vec<i32>, HashMap<i32, Usage>);

/// The snapshot shared between the loop and the reporters, and what does not change.
pub struct Shared {
    snapshot: Mutex<Snapshot>,
    /// The last /proc scan for /metrics: a flood of requests costs one scan per `USAGE_CACHE`.
    usage: Mutex<Option<UsageScan>>,
    pub balance: &'static str,
    pub min_ready: usize,
    /// Why a public port is not the pool's alone (foreign listeners joined it), by address:
    /// not ready while any is. Each port's watch reports only its own.
    port_taken: Mutex<std::collections::BTreeMap<(std::net::IpAddr, u16), String>>,
}

impl Shared {
    pub fn new(balance: &'static str, min_ready: usize) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: Mutex::new(Snapshot::empty(Instant::now())),
            usage: Mutex::new(None),
            balance,
            min_ready,
            port_taken: Mutex::new(std::collections::BTreeMap::new()),
        })
    }

    pub fn publish(&self, snapshot: Snapshot) {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The watch of `host:port` found listeners there that are not the pool's (Some: why), or
    /// they left (None). The other ports' reports stand.
    pub fn set_port_taken(&self, host: std::net::IpAddr, port: u16, why: Option<String>) {
        let mut taken = self.port_taken.lock().unwrap_or_else(|p| p.into_inner());
        match why {
            Some(why) => taken.insert((host, port), why),
            None => taken.remove(&(host, port)),
        };
    }

    /// Why public ports are not the pools' alone, every such port's reason; None while all are.
    pub fn port_taken(&self) -> Option<String> {
        let taken = self.port_taken.lock().unwrap_or_else(|p| p.into_inner());
        (!taken.is_empty()).then(|| taken.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// `group_usage(groups)`, read again only when the last reading is older than
    /// `USAGE_CACHE` or was of other groups (a worker was replaced).
    pub fn cached_usage(&self, groups: &[i32]) -> HashMap<i32, Usage> {
        let mut cache = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, cached, usage)) = cache.as_ref()
            && at.elapsed() < USAGE_CACHE
            && cached == groups
        {
            return usage.clone();
        }
        let usage = group_usage(groups);
        *cache = Some((Instant::now(), groups.to_vec(), usage.clone()));
        usage
    }

    /// The supervisor loop turned recently.
    pub fn healthy(&self) -> bool {
        self.snapshot().heartbeat.elapsed() < HEARTBEAT_LIMIT
    }

    /// Enough workers are ready, no stop is under way and the port is the pool's alone. With
    /// several pools: each has its `min_ready` ready, but a oneshot pool that finished.
    pub fn ready(&self) -> bool {
        let snap = self.snapshot();
        let enough = if snap.pools.is_empty() {
            snap.slots.iter().filter(|s| s.ready).count() >= self.min_ready.max(1)
        } else {
            let mut slots = snap.slots.iter();
            snap.pools.iter().all(|p| {
                let ready = slots.by_ref().take(p.slots).filter(|s| s.ready).count();
                p.state == "finished" || ready >= p.min_ready.max(1)
            })
        };
        !snap.stopping && enough && self.healthy() && self.port_taken().is_none()
    }
}

/// Memory and CPU of one process group.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub processes: usize,
}

/// Sums RSS and CPU time of every process whose process group is one of `groups`, from
/// /proc/<pid>/stat (fields pgrp, utime, stime, rss).
pub fn group_usage(groups: &[i32]) -> HashMap<i32, Usage> {
    let mut usage: HashMap<i32, Usage> = groups.iter().map(|&g| (g, Usage::default())).collect();
    if groups.is_empty() {
        return usage;
    }
    use nix::unistd::{SysconfVar, sysconf};
    let value = |var| sysconf(var).ok().flatten().unwrap_or(0).max(1);
    let (ticks, page) = (
        value(SysconfVar::CLK_TCK) as f64,
        value(SysconfVar::PAGE_SIZE) as u64,
    );
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return usage;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((pgrp, cpu_ticks, rss_pages)) = parse_stat(&stat) else {
            continue;
        };
        if let Some(u) = usage.get_mut(&pgrp) {
            u.rss_bytes += rss_pages * page;
            u.cpu_seconds += cpu_ticks as f64 / ticks;
            u.processes += 1;
        }
    }
    usage
}

/// (pgrp, utime + stime, rss) from a /proc/<pid>/stat line.
fn parse_stat(stat: &str) -> Option<(i32, u64, u64)> {
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ")": state(0) ppid(1) pgrp(2) ... utime(11) stime(12) ... rss(21)
    let pgrp = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss = fields.get(21)?.parse::<i64>().ok()?.max(0) as u64;
    Some((pgrp, utime + stime, rss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let line = "1234 (node server (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 11 0 100 1000000 2560 18446744073709551615";
        assert_eq!(parse_stat(line), Some((1234, 300, 2560)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_group_usage() {
        let me = nix::unistd::getpgrp().as_raw();
        let usage = group_usage(&[me]);
        assert!(usage[&me].rss_bytes > 0 && usage[&me].processes >= 1);
    }
}
