//! Control: `corepool status` and `corepool reload` from inside the container.
//!
//! The running supervisor listens on a Linux abstract unix socket (`@corepool`, or
//! `@$COREPOOL_CONTROL`): nothing is written to disk, so it works on a read-only root. The
//! kernel tells us who connects (SO_PEERCRED); anyone but our own user and root is refused. One
//! request per connection, one line: `status` answers JSON, `reload` starts a rolling reload.

use crate::metrics::{Shared, group_usage};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// What a client may ask of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Reload,
}

/// The abstract socket's name: bytes, as COREPOOL_CONTROL gives them (UTF-8 or not).
pub fn socket_name() -> std::ffi::OsString {
    std::env::var_os("COREPOOL_CONTROL")
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "corepool".into())
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

/// Answers clients until the process exits.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
) {
    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
        return;
    };
    // SAFETY: geteuid has no memory effects.
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == me || c.uid() == 0)
            .unwrap_or(false);
        tokio::spawn(answer(stream, allowed, shared.clone(), commands.clone()));
    }
}

async fn answer(
    stream: UnixStream,
    allowed: bool,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(256));
    let got = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    if !matches!(got, Ok(Ok(_))) {
        return;
    }
    let reply = if !allowed {
        "error: permission denied (corepool answers only its own user and root)\n".to_string()
    } else {
        match line.trim() {
            "status" => format!("{}\n", status_json(&shared).await),
            "reload" => match commands.send(Command::Reload) {
                Ok(()) => "ok: rolling reload started\n".to_string(),
                Err(_) => "error: the pool is not running\n".to_string(),
            },
            other => format!("error: unknown request '{other}'\n"),
        }
    };
    let _ = write.write_all(reply.as_bytes()).await;
}

/// Status of every slot, with RSS and CPU% of its process group over a 200 ms sample.
async fn status_json(shared: &Shared) -> Value {
    let snap = shared.snapshot();
    let groups: Vec<i32> = snap.slots.iter().filter_map(|s| s.pid).collect();
    let before = group_usage(&groups);
    let sample = Duration::from_millis(200);
    tokio::time::sleep(sample).await;
    let after = group_usage(&groups);
    let workers: Vec<Value> = snap
        .slots
        .iter()
        .map(|s| {
            let usage = s.pid.and_then(|p| after.get(&p).copied());
            let cpu = s.pid.and_then(|p| {
                let (a, b) = (after.get(&p)?, before.get(&p)?);
                Some(((a.cpu_seconds - b.cpu_seconds) / sample.as_secs_f64() * 100.0).max(0.0))
            });
            json!({
                "slot": s.slot,
                "pid": s.pid,
                "state": s.state,
                "ready": s.ready,
                "uptime_seconds": s.uptime.map(|u| u.as_secs()),
                "restarts": s.restarts,
                "rss_bytes": usage.map(|u| u.rss_bytes),
                "cpu_percent": cpu.map(|c| (c * 10.0).round() / 10.0),
                "processes": usage.map(|u| u.processes),
            })
        })
        .collect();
    json!({
        "balance": shared.balance,
        "stopping": snap.stopping,
        "reloads": snap.reloads,
        "workers": workers,
    })
}

/// Client side: sends one request to the running corepool and returns its answer.
pub fn request(what: &str) -> Result<String, String> {
    let raw = socket_name();
    let name = raw.to_string_lossy();
    let addr = address(&raw).map_err(|e| format!("bad control socket name @{name}: {e}"))?;
    let mut stream = std::os::unix::net::UnixStream::connect_addr(&addr)
        .map_err(|e| format!("no corepool is running here (control socket @{name}: {e})"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    stream
        .write_all(format!("{what}\n").as_bytes())
        .map_err(|e| format!("control socket @{name}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("control socket @{name}: {e}"))?;
    match answer.strip_prefix("error: ") {
        Some(err) => Err(err.trim().to_string()),
        None => Ok(answer),
    }
}

/// The status JSON as a table for people.
pub fn status_table(status: &Value) -> String {
    let mut out = format!(
        "{:<5} {:<8} {:<9} {:<6} {:>9} {:>8} {:>10} {:>6}\n",
        "SLOT", "PID", "STATE", "READY", "UPTIME", "RESTARTS", "RSS", "CPU%"
    );
    let empty = Vec::new();
    for w in status["workers"].as_array().unwrap_or(&empty) {
        let dash = || "-".to_string();
        let pid = w["pid"]
            .as_i64()
            .map(|p| p.to_string())
            .unwrap_or_else(dash);
        let uptime = w["uptime_seconds"]
            .as_u64()
            .map(|s| format!("{}s", s))
            .unwrap_or_else(dash);
        let rss = w["rss_bytes"]
            .as_u64()
            .map(|b| format!("{:.1}MiB", b as f64 / 1048576.0))
            .unwrap_or_else(dash);
        let cpu = w["cpu_percent"]
            .as_f64()
            .map(|c| format!("{c:.1}"))
            .unwrap_or_else(dash);
        out.push_str(&format!(
            "{:<5} {:<8} {:<9} {:<6} {:>9} {:>8} {:>10} {:>6}\n",
            w["slot"].as_u64().unwrap_or(0),
            pid,
            w["state"].as_str().unwrap_or("?"),
            if w["ready"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            uptime,
            w["restarts"].as_u64().unwrap_or(0),
            rss,
            cpu
        ));
    }
    out
}
