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

pub mod health;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The supervisor loop is considered alive while it published within this long (it wakes at
/// least once a second).
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(5);
/// At most this many connections are open at once on the metrics port.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request head within this long, and take the answer within as
/// long again; then it is disconnected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A request head is at most this long.
const MAX_HEAD: usize = 8192;
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
    /// Proxy mode: `--max-connections`, and the times the accept loop stopped at it.
    pub connection_limit: Option<(usize, u64)>,
    /// Several pools (`[pool.NAME]`): each, in order, owning the next `slots` of `slots`.
    /// Empty for the single unnamed pool (no `pool` label anywhere).
    pub pools: Vec<PoolView>,
    /// A manual `corepool scale` pinned the worker count (of any pool).
    pub pinned: bool,
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

/// `corepool_workers_configured`'s help.
const CONFIGURED_HELP: &str =
    "The worker count the pool runs (--instances, then corepool scale or the CPU follow)";
/// `corepool_workers_pinned`'s help.
const PINNED_HELP: &str = "1 while a manual corepool scale pins the worker count";

/// Usage of some process groups, and when it was read.
type UsageScan = (Instant, Vec<i32>, HashMap<i32, Usage>);

/// The snapshot shared between the loop and the reporters, and what does not change.
pub struct Shared {
    snapshot: Mutex<Snapshot>,
    /// The last /proc scan for /metrics: a flood of requests costs one scan per `USAGE_CACHE`.
    usage: Mutex<Option<UsageScan>>,
    pub balance: &'static str,
    pub min_ready: usize,
    /// Why the public port is not the pool's alone (foreign listeners joined it): not ready.
    port_taken: Mutex<Option<String>>,
}

impl Shared {
    pub fn new(balance: &'static str, min_ready: usize) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: Mutex::new(Snapshot {
                heartbeat: Instant::now(),
                slots: Vec::new(),
                stopping: false,
                reloads: 0,
                memory_restarts: 0,
                open_connections: None,
                connections_total: None,
                connection_limit: None,
                pools: Vec::new(),
                pinned: false,
            }),
            usage: Mutex::new(None),
            balance,
            min_ready,
            port_taken: Mutex::new(None),
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

    /// The port watch found listeners that are not the pool's (Some: why), or they left (None).
    pub fn set_port_taken(&self, why: Option<String>) {
        *self.port_taken.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    pub fn port_taken(&self) -> Option<String> {
        self.port_taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// The Prometheus text exposition of a snapshot.
pub fn render(shared: &Shared) -> String {
    let snap = shared.snapshot();
    let mut registry = Registry::with_prefix("corepool");

    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&labels(&[
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("balance", shared.balance.to_string()),
    ]))
    .set(1);
    registry.register("info", "corepool version and balance mode", info);
    if !snap.pools.is_empty() {
        let pools = Family::<Labels, Gauge>::default();
        for p in &snap.pools {
            pools
                .get_or_create(&labels(&[
                    ("pool", p.name.clone()),
                    ("balance", p.balance.to_string()),
                    ("state", p.state.to_string()),
                ]))
                .set(1);
        }
        registry.register("pool_info", "Each pool, its balance mode and state", pools);
    }

    // Several pools: every worker series gets a `pool` label (none for a single pool).
    let by_pool = snap.slots_by_pool();
    let names: Vec<&str> = if snap.pools.is_empty() {
        vec![""]
    } else {
        snap.pools.iter().map(|p| p.name.as_str()).collect()
    };
    let with_pool = |pool: &str, mut pairs: Vec<(&str, String)>| {
        if !pool.is_empty() {
            pairs.insert(0, ("pool", pool.to_string()));
        }
        labels(&pairs)
    };
    let states = Family::<Labels, Gauge>::default();
    for &pool in &names {
        for state in [
            "waiting", "queued", "running", "stopping", "done", "given-up",
        ] {
            let n = by_pool
                .iter()
                .filter(|(p, s)| *p == pool && s.state == state)
                .count();
            states
                .get_or_create(&with_pool(pool, vec![("state", state.to_string())]))
                .set(n as i64);
        }
    }
    registry.register("workers", "Worker slots by state", states);

    if snap.pools.is_empty() {
        let configured = Gauge::<i64>::default();
        configured.set(snap.slots.len() as i64);
        registry.register("workers_configured", CONFIGURED_HELP, configured);
        let pinned = Gauge::<i64>::default();
        pinned.set(i64::from(snap.pinned));
        registry.register("workers_pinned", PINNED_HELP, pinned);
    } else {
        let configured = Family::<Labels, Gauge>::default();
        let pinned = Family::<Labels, Gauge>::default();
        for p in &snap.pools {
            configured
                .get_or_create(&with_pool(&p.name, Vec::new()))
                .set(p.slots as i64);
            pinned
                .get_or_create(&with_pool(&p.name, Vec::new()))
                .set(i64::from(p.pinned));
        }
        registry.register("workers_configured", CONFIGURED_HELP, configured);
        registry.register("workers_pinned", PINNED_HELP, pinned);
    }

    if snap.pools.is_empty() {
        let ready = Gauge::<i64>::default();
        ready.set(snap.slots.iter().filter(|s| s.ready).count() as i64);
        registry.register("workers_ready", "Workers accepting connections", ready);
    } else {
        let ready = Family::<Labels, Gauge>::default();
        for &pool in &names {
            let n = by_pool
                .iter()
                .filter(|(p, s)| *p == pool && s.ready)
                .count();
            ready
                .get_or_create(&with_pool(pool, Vec::new()))
                .set(n as i64);
        }
        registry.register("workers_ready", "Workers accepting connections", ready);
    }

    let restarts = Family::<Labels, Counter>::default();
    let rss = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let cpu = Family::<Labels, Counter<f64, AtomicU64>>::default();
    let groups: Vec<i32> = snap.slots.iter().filter_map(|s| s.pid).collect();
    let usage = shared.cached_usage(&groups);
    for (pool, s) in &by_pool {
        let slot = with_pool(pool, vec![("slot", s.slot.to_string())]);
        restarts.get_or_create(&slot).inc_by(s.restarts);
        if let Some(u) = s.pid.and_then(|p| usage.get(&p)) {
            rss.get_or_create(&slot).set(u.rss_bytes as f64);
            cpu.get_or_create(&slot).inc_by(u.cpu_seconds);
        }
    }
    registry.register("worker_restarts", "Restarts per worker slot", restarts);
    registry.register(
        "worker_rss_bytes",
        "Resident memory of the worker's whole process group",
        rss,
    );
    registry.register(
        "worker_cpu_seconds",
        "CPU time of the worker's current process group",
        cpu,
    );

    let reloads = Counter::<u64>::default();
    reloads.inc_by(snap.reloads);
    registry.register("reloads", "Rolling reloads started", reloads);
    let memory_restarts = Counter::<u64>::default();
    memory_restarts.inc_by(snap.memory_restarts);
    registry.register(
        "memory_restarts",
        "Workers replaced for staying above --max-memory",
        memory_restarts,
    );
    if let (Some(open), Some(total)) = (snap.open_connections, snap.connections_total) {
        let open_gauge = Gauge::<i64>::default();
        open_gauge.set(open as i64);
        registry.register(
            "proxy_connections_open",
            "Connections open: being relayed, or waiting for a ready worker",
            open_gauge,
        );
        let total_counter = Counter::<u64>::default();
        total_counter.inc_by(total);
        registry.register(
            "proxy_connections",
            "Connections accepted by the proxy",
            total_counter,
        );
    }
    if let Some((max, reached)) = snap.connection_limit {
        let max_gauge = Gauge::<i64>::default();
        max_gauge.set(i64::try_from(max).unwrap_or(i64::MAX));
        registry.register(
            "proxy_max_connections",
            "Connections the proxy relays at once (--max-connections)",
            max_gauge,
        );
        let reached_counter = Counter::<u64>::default();
        reached_counter.inc_by(reached);
        registry.register(
            "proxy_max_connections_reached",
            "Times the proxy stopped accepting at --max-connections (clients then wait in the \
             listen backlog)",
            reached_counter,
        );
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

/// One open connection of the metrics port.
struct Conn {
    task: tokio::task::AbortHandle,
    /// Its request head has arrived: it is being answered, and is not evicted.
    answering: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process exits.
///
/// At most `MAX_CONNECTIONS` are open at once. A new connection past that closes the one that
/// has waited longest without sending its request (an idle or slow client), so that idle
/// connections can never lock a probe out; when every open connection is being answered, the
/// new one is closed at once.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut open: VecDeque<Conn> = VecDeque::new();
    let mut evicted_logged: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("metrics: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        open.retain(|c| !c.task.is_finished());
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .position(|c| !c.answering.load(Ordering::Relaxed));
            let Some(oldest) = idle else {
                drop(stream);
                continue;
            };
            if let Some(conn) = open.remove(oldest) {
                conn.task.abort();
            }
            if evicted_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                evicted_logged = Some(Instant::now());
                tracing::warn!(
                    "metrics: {MAX_CONNECTIONS} connections open: closing the one idle longest"
                );
            }
        }
        let answering = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(answer(stream, shared.clone(), answering.clone()));
        open.push_back(Conn {
            task: task.abort_handle(),
            answering,
        });
        // Let the connections just accepted read their request before the next accept.
        tokio::task::yield_now().await;
    }
}

/// Binds the metrics address (before any worker starts, so a mistake fails early).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// One HTTP/1.x request: read the request head (bounded in size and time), answer, close.
async fn answer(mut stream: TcpStream, shared: Arc<Shared>, answering: Arc<AtomicBool>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() || head.is_empty() {
        return;
    }
    answering.store(true, Ordering::Relaxed);
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", prometheus_text::CONTENT_TYPE, render(&shared)),
        ("GET" | "HEAD", "/healthz") if shared.healthy() => ("200 OK", "text/plain", "ok\n".into()),
        ("GET" | "HEAD", "/healthz") => (
            "503 Service Unavailable",
            "text/plain",
            "supervisor stalled\n".into(),
        ),
        ("GET" | "HEAD", "/readyz") => readyz(&shared),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

fn readyz(shared: &Shared) -> (&'static str, &'static str, String) {
    let snap = shared.snapshot();
    let ready = snap.slots.iter().filter(|s| s.ready).count();
    if shared.ready() {
        (
            "200 OK",
            "text/plain",
            format!("ready: {ready} of {} workers\n", snap.slots.len()),
        )
    } else if snap.stopping {
        ("503 Service Unavailable", "text/plain", "stopping\n".into())
    } else if let Some(why) = shared.port_taken() {
        (
            "503 Service Unavailable",
            "text/plain",
            format!("not ready: {why}\n"),
        )
    } else {
        (
            "503 Service Unavailable",
            "text/plain",
            format!(
                "not ready: {ready} of {} workers ready, {} needed\n",
                snap.slots.len(),
                shared.min_ready
            ),
        )
    }
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

    #[test]
    fn renders_prometheus_text() {
        let shared = Shared::new("socket", 1);
        let mut snap = shared.snapshot();
        snap.slots = vec![SlotView {
            slot: 0,
            pid: None,
            state: "waiting",
            ready: false,
            restarts: 3,
            uptime: None,
        }];
        shared.publish(snap);
        let text = render(&shared);
        assert!(
            text.contains("corepool_info{version=\"0.1.0\",balance=\"socket\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("corepool_workers{state=\"waiting\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("corepool_worker_restarts_total{slot=\"0\"} 3"),
            "{text}"
        );
        assert!(text.contains("corepool_workers_ready 0"), "{text}");
        assert!(!shared.ready());
    }
}
