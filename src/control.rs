//! Control: `corepool status`, `corepool reload` and `corepool scale` from inside the
//! container, both sides of the protocol: the server the pool runs, and the client subcommands.
//!
//! The running supervisor listens on a Linux abstract unix socket (`@corepool-<pid namespace
//! inode>`, or `@$COREPOOL_CONTROL`): nothing is written to disk, so it works on a read-only root. The
//! kernel tells us who connects (SO_PEERCRED); anyone but our own user and root is refused at
//! accept. One request per connection, one line: `status` answers JSON, `reload` asks for a
//! rolling reload (coalesced like SIGHUP) and answers what the pool made of it; `scale [POOL]
//! N|+K|-K|auto` changes the worker count (see `scale`) and answers likewise. The listener
//! serves at most `MAX_CONNECTIONS` clients at once, each for at most `REQUEST_TIMEOUT` per
//! step. The client checks the server's credentials (root, its own user or PID 1) before
//! trusting its answer.

use crate::fatal::Fatal;
use crate::metrics::{Shared, group_usage};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// What a client may ask of the pool.
#[derive(Debug)]
pub enum Command {
    /// A rolling reload of one pool (by name) or of all; the pool says on the channel what it
    /// made of the request.
    Reload(Option<String>, oneshot::Sender<ReloadAnswer>),
    /// A scale of one pool (by name; None: the only one); the pool answers what it did, or
    /// why not.
    Scale(
        crate::scale::Request,
        oneshot::Sender<Result<String, String>>,
    ),
}

/// What became of a reload request. Requests are coalesced as SIGHUPs are: one that arrives
/// while a reload runs is merged into a single follow-up reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadAnswer {
    Started,
    Follows,
    Stopping,
}

impl ReloadAnswer {
    fn line(self) -> &'static str {
        match self {
            ReloadAnswer::Started => "ok: rolling reload started\n",
            ReloadAnswer::Follows => {
                "ok: a rolling reload is under way; one more follows it (requests meanwhile are merged into it)\n"
            }
            ReloadAnswer::Stopping => "error: the pool is stopping; no reload\n",
        }
    }
}

/// At most this many clients are served at once; further ones wait in the kernel's accept
/// queue (only our own user and root get this far, and each is done within `REQUEST_TIMEOUT`).
pub const MAX_CONNECTIONS: usize = 16;
/// A client must send its request line within this long, and read the answer within as long
/// again; then it is disconnected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A request line is at most this long.
const MAX_REQUEST: u64 = 256;

/// The abstract socket's name: `$COREPOOL_CONTROL`, else `corepool-<pid namespace>`.
///
/// Abstract names are shared by the whole network namespace, and a pod's containers share
/// one: a fixed name would let the second container's pool find the name taken, and its
/// `corepool status` reach the first pool. Each container has a pid namespace of its own, and
/// `corepool status` run with `docker exec` or `kubectl exec` is in it, so the server and its
/// clients agree on the name without being told. The variable is bytes, UTF-8 or not.
pub fn socket_name() -> std::ffi::OsString {
    if let Some(name) = crate::config::env::control_socket() {
        return name;
    }
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(ns) => format!("corepool-{}", ns.ino()).into(),
        // No /proc: one pool per network namespace, as before.
        Err(_) => "corepool".into(),
    }
}

fn address(name: &std::ffi::OsStr) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// Binds the control socket; a second corepool in the same network namespace (another
/// container of the pod) gets an error it can log and live without.
pub fn bind() -> std::io::Result<std::os::unix::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind_addr(&address(&socket_name())?)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Answers clients until the process exits: at most `MAX_CONNECTIONS` at once, each within
/// `REQUEST_TIMEOUT`. Anyone but our own user and root is answered with a refusal at accept,
/// without reading, and disconnected at once.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!("control socket unusable: {err}");
            return;
        }
    };
    let me = nix::unistd::geteuid().as_raw();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused_logged: Option<Instant> = None;
    loop {
        // A free slot first: past the cap, connections wait in the kernel's queue and cost
        // corepool no descriptor.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("control socket: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid());
        if !matches!(uid, Ok(u) if u == me || u == 0) {
            // Known at accept: refuse now, hold nothing. The line fits in the socket buffer.
            let _ = stream.try_write(
                b"error: permission denied (corepool answers only its own user and root)\n",
            );
            if refused_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                refused_logged = Some(Instant::now());
                match uid {
                    Ok(uid) => tracing::warn!("control socket: refused a client of uid {uid}"),
                    Err(err) => tracing::warn!("control socket: refused a client: {err}"),
                }
            }
            continue;
        }
        tokio::spawn(answer(stream, permit, shared.clone(), commands.clone()));
    }
}

async fn answer(
    stream: UnixStream,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let got = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    if !matches!(got, Ok(Ok(_))) {
        return;
    }
    let mut words = line.split_whitespace();
    let (verb, pool) = (words.next().unwrap_or(""), words.next());
    let reply = match verb {
        "status" => match serde_json::to_string(&status(&shared).await) {
            Ok(json) => format!("{json}\n"),
            Err(err) => format!("error: cannot encode the status: {err}\n"),
        },
        "reload" if words.next().is_some() => "error: reload takes one pool name\n".to_string(),
        "reload" if let Some(why) = pool.and_then(|p| unknown_pool(&shared, p)) => {
            format!("error: {why}\n")
        }
        "reload" => {
            let (tx, rx) = oneshot::channel();
            match commands.send(Command::Reload(pool.map(str::to_string), tx)) {
                Ok(()) => match rx.await {
                    Ok(answer) => answer.line().to_string(),
                    Err(_) => "error: the pool is not running\n".to_string(),
                },
                Err(_) => "error: the pool is not running\n".to_string(),
            }
        }
        "scale" => {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            match crate::scale::Request::parse(&words) {
                Err(err) => format!("error: {err}\n"),
                Ok(request) => match request
                    .pool
                    .as_deref()
                    .and_then(|p| unknown_pool(&shared, p))
                {
                    Some(why) => format!("error: {why}\n"),
                    None => {
                        let (tx, rx) = oneshot::channel();
                        match commands.send(Command::Scale(request, tx)) {
                            Ok(()) => match rx.await {
                                Ok(Ok(done)) => format!("ok: {done}\n"),
                                Ok(Err(err)) => format!("error: {err}\n"),
                                Err(_) => "error: the pool is not running\n".to_string(),
                            },
                            Err(_) => "error: the pool is not running\n".to_string(),
                        }
                    }
                },
            }
        }
        _ => format!("error: unknown request '{}'\n", line.trim()),
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(reply.as_bytes())).await;
}

/// Why `pool` names no pool of this corepool, if it does not.
fn unknown_pool(shared: &Shared, pool: &str) -> Option<String> {
    let snap = shared.snapshot();
    if snap.pools.is_empty() {
        return Some(format!(
            "no pool '{pool}': this corepool runs one pool without a name (leave the name out)"
        ));
    }
    if snap.pools.iter().any(|p| p.name == pool) {
        return None;
    }
    let names: Vec<&str> = snap.pools.iter().map(|p| p.name.as_str()).collect();
    Some(format!(
        "no pool '{pool}' here (pools: {})",
        names.join(", ")
    ))
}

/// What `corepool status --json` prints: the pool and each of its slots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub balance: String,
    pub stopping: bool,
    pub reloads: u64,
    /// The worker count the pool runs now (after any scale).
    #[serde(default)]
    pub instances: usize,
    /// A manual `corepool scale` pinned the count (`corepool scale auto` un-pins it).
    #[serde(default)]
    pub pinned: bool,
    pub workers: Vec<WorkerStatus>,
    /// Processes still on their way out: replaced by a reload ("retiring") or of a slot a
    /// scale removed ("removed"), each until it exits (with its usage, as a worker's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaving: Vec<WorkerStatus>,
    /// Several pools: each with its balance mode and state, in order; a worker names its pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
}

/// One pool of several in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub balance: String,
    /// waiting, running, stopping, finished (a oneshot pool done with 0), done.
    pub state: String,
    /// Its worker count now (after any scale).
    #[serde(default)]
    pub instances: usize,
    /// A manual `corepool scale` pinned its count.
    #[serde(default)]
    pub pinned: bool,
}

/// One slot in [`Status`]; usage is of the worker's whole process group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its pool, when there are several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub slot: usize,
    pub pid: Option<i32>,
    pub state: String,
    pub ready: bool,
    pub uptime_seconds: Option<u64>,
    pub restarts: u64,
    pub rss_bytes: Option<u64>,
    /// CPU over a 200 ms sample, one decimal.
    pub cpu_percent: Option<f64>,
    pub processes: Option<usize>,
}

/// Status of every slot, with RSS and CPU% of its process group over a 200 ms sample.
async fn status(shared: &Shared) -> Status {
    let snap = shared.snapshot();
    let groups: Vec<i32> = snap
        .slots
        .iter()
        .filter_map(|s| s.pid)
        .chain(snap.leaving.iter().map(|l| l.pid))
        .collect();
    let before = group_usage(&groups);
    let sample = Duration::from_millis(200);
    tokio::time::sleep(sample).await;
    let after = group_usage(&groups);
    // RSS, CPU% over the sample and process count of the group `pid` leads.
    let usage = |pid: Option<i32>| {
        let now = pid.and_then(|p| after.get(&p).copied());
        let cpu = pid.and_then(|p| {
            let (a, b) = (after.get(&p)?, before.get(&p)?);
            Some(((a.cpu_seconds - b.cpu_seconds) / sample.as_secs_f64() * 100.0).max(0.0))
        });
        (
            now.map(|u| u.rss_bytes),
            cpu.map(|c| (c * 10.0).round() / 10.0),
            now.map(|u| u.processes),
        )
    };
    let workers = snap
        .slots_by_pool()
        .into_iter()
        .map(|(pool, s)| {
            let (rss_bytes, cpu_percent, processes) = usage(s.pid);
            WorkerStatus {
                pool: (!pool.is_empty()).then(|| pool.to_string()),
                slot: s.slot,
                pid: s.pid,
                state: s.state.to_string(),
                ready: s.ready,
                uptime_seconds: s.uptime.map(|u| u.as_secs()),
                restarts: s.restarts,
                rss_bytes,
                cpu_percent,
                processes,
            }
        })
        .collect();
    let leaving = snap
        .leaving
        .iter()
        .map(|l| {
            let (rss_bytes, cpu_percent, processes) = usage(Some(l.pid));
            WorkerStatus {
                pool: (!l.pool.is_empty()).then(|| l.pool.clone()),
                slot: l.slot,
                pid: Some(l.pid),
                state: l.state.to_string(),
                ready: false,
                uptime_seconds: None,
                restarts: 0,
                rss_bytes,
                cpu_percent,
                processes,
            }
        })
        .collect();
    Status {
        balance: shared.balance.to_string(),
        stopping: snap.stopping,
        reloads: snap.reloads,
        instances: snap.slots.len(),
        pinned: snap.pinned,
        workers,
        leaving,
        pools: snap
            .pools
            .iter()
            .map(|p| PoolStatus {
                name: p.name.clone(),
                balance: p.balance.to_string(),
                state: p.state.to_string(),
                instances: p.slots,
                pinned: p.pinned,
            })
            .collect(),
    }
}

/// `corepool status [--json]`: each worker of the pool running here, as a table or as JSON.
/// Ok is what to print on stdout (exit 0).
pub fn status_command(args: &[String]) -> Result<String, Fatal> {
    const USAGE: &str = "corepool status [--json]   (each worker of the pool running here)";
    if wants_help(args) {
        return Ok(format!("usage: {USAGE}\n"));
    }
    let json = match args {
        [] => false,
        [flag] if flag == "--json" => true,
        _ => return Err(Fatal::usage(format_args!("usage: {USAGE}"))),
    };
    let answer = request("status").map_err(|err| Fatal::new(1, err))?;
    if json {
        return Ok(answer);
    }
    Ok(match serde_json::from_str::<Status>(&answer) {
        Ok(status) => status_table(&status),
        Err(_) => answer,
    })
}

/// `corepool reload`: a rolling reload of the pool running here; Ok is its answer.
pub fn reload_command(args: &[String]) -> Result<String, Fatal> {
    const USAGE: &str = "corepool reload [POOL]   (a rolling reload of the pool running here, or \
                         of the pool named when it runs several)";
    if wants_help(args) {
        return Ok(format!("usage: {USAGE}\n"));
    }
    let request_line = match args {
        [] => "reload".to_string(),
        [pool] if !pool.starts_with('-') && !pool.contains(char::is_whitespace) => {
            format!("reload {pool}")
        }
        _ => return Err(Fatal::usage(format_args!("usage: {USAGE}"))),
    };
    request(&request_line).map_err(|err| Fatal::new(1, err))
}

/// `corepool scale [POOL] N|+K|-K|auto`: changes the worker count of the pool running here;
/// Ok is its answer. Bad arguments are a usage error (2) before anything is sent; a refusal
/// by the pool is 1.
pub fn scale_command(args: &[String]) -> Result<String, Fatal> {
    const USAGE: &str = "corepool scale [POOL] N|+K|-K|auto   (change the worker count of the \
                         pool running here, or of pool POOL: needed when several run; N, +K, -K \
                         pin it, auto follows --instances again)";
    if wants_help(args) {
        return Ok(format!("usage: {USAGE}\n"));
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let scale = crate::scale::Request::parse(&words)
        .map_err(|err| Fatal::usage(format_args!("scale: {err} (usage: {USAGE})")))?;
    request(&scale.line()).map_err(|err| Fatal::new(1, format_args!("scale: {err}")))
}

fn wants_help(args: &[String]) -> bool {
    matches!(args, [flag] if flag == "--help" || flag == "-h")
}

/// Client side: sends one request to the running corepool and returns its answer. Whoever
/// serves the name must be root, our own user or PID 1 (SO_PEERCRED), or nothing is sent.
pub fn request(what: &str) -> Result<String, String> {
    let raw = socket_name();
    let name = raw.to_string_lossy();
    let addr = address(&raw).map_err(|e| format!("bad control socket name @{name}: {e}"))?;
    let mut stream = std::os::unix::net::UnixStream::connect_addr(&addr)
        .map_err(|e| format!("no corepool is running here (control socket @{name}: {e})"))?;
    let me = nix::unistd::geteuid().as_raw();
    match peer_cred(&stream) {
        // PID 1 is the container's init, which no impostor can be (a root `docker exec` into
        // a pool that runs as another user).
        Ok(cred) if cred.uid == 0 || cred.uid == me || cred.pid == 1 => {}
        Ok(cred) => {
            return Err(format!(
                "control socket @{name} is served by uid {} (pid {}), neither root nor our uid \
                 {me} nor PID 1: not trusted (another program holds the name)",
                cred.uid, cred.pid
            ));
        }
        Err(err) => return Err(format!("control socket @{name}: SO_PEERCRED: {err}")),
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    // A server that refuses us answers at once and closes: read its answer even if the
    // request could not be written.
    let sent = stream.write_all(format!("{what}\n").as_bytes());
    let mut answer = String::new();
    let read = stream.read_to_string(&mut answer);
    if answer.is_empty() {
        if let Err(err) = sent.and(read.map(|_| ())) {
            return Err(format!("control socket @{name}: {err}"));
        }
        return Err(format!("control socket @{name}: closed without an answer"));
    }
    match answer.strip_prefix("error: ") {
        Some(err) => Err(err.trim().to_string()),
        None => Ok(answer),
    }
}

/// Who is at the other end of a connected unix socket (for a client: who called listen).
fn peer_cred(stream: &std::os::unix::net::UnixStream) -> std::io::Result<libc::ucred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// The status as a table for people; with several pools, one table per pool under a line
/// naming it.
pub fn status_table(status: &Status) -> String {
    if status.pools.is_empty() {
        return worker_table(status.workers.iter().chain(&status.leaving));
    }
    let mut out = String::new();
    for (i, pool) in status.pools.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "pool {} ({}, {}{})\n",
            pool.name,
            pool.balance,
            pool.state,
            if pool.pinned {
                ", count pinned by corepool scale"
            } else {
                ""
            }
        ));
        out.push_str(&worker_table(
            status
                .workers
                .iter()
                .chain(&status.leaving)
                .filter(|w| w.pool.as_deref() == Some(pool.name.as_str())),
        ));
    }
    out
}

fn worker_table<'a>(workers: impl Iterator<Item = &'a WorkerStatus>) -> String {
    let mut out = format!(
        "{:<5} {:<8} {:<9} {:<6} {:>9} {:>8} {:>10} {:>6}\n",
        "SLOT", "PID", "STATE", "READY", "UPTIME", "RESTARTS", "RSS", "CPU%"
    );
    let dash = || "-".to_string();
    for w in workers {
        let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(dash);
        let uptime = w
            .uptime_seconds
            .map(|s| format!("{s}s"))
            .unwrap_or_else(dash);
        let rss = w
            .rss_bytes
            .map(|b| format!("{:.1}MiB", b as f64 / 1048576.0))
            .unwrap_or_else(dash);
        let cpu = w
            .cpu_percent
            .map(|c| format!("{c:.1}"))
            .unwrap_or_else(dash);
        out.push_str(&format!(
            "{:<5} {:<8} {:<9} {:<6} {:>9} {:>8} {:>10} {:>6}\n",
            w.slot,
            pid,
            w.state,
            if w.ready { "yes" } else { "no" },
            uptime,
            w.restarts,
            rss,
            cpu
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_back_and_renders() {
        let text = r#"{"balance":"socket","stopping":false,"reloads":2,"workers":[
            {"slot":0,"pid":41,"state":"running","ready":true,"uptime_seconds":12,"restarts":1,
             "rss_bytes":52428800,"cpu_percent":3.5,"processes":2},
            {"slot":1,"pid":null,"state":"waiting","ready":false,"uptime_seconds":null,
             "restarts":4,"rss_bytes":null,"cpu_percent":null,"processes":null}]}"#;
        let status: Status = serde_json::from_str(text).unwrap();
        let again: Status = serde_json::from_str(&serde_json::to_string(&status).unwrap()).unwrap();
        assert_eq!(status, again);
        let table = status_table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1]
                .split_whitespace()
                .eq(["0", "41", "running", "yes", "12s", "1", "50.0MiB", "3.5"].into_iter())
        );
        assert!(
            lines[2]
                .split_whitespace()
                .eq(["1", "-", "waiting", "no", "-", "4", "-", "-"].into_iter())
        );
    }
}
