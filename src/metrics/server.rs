//! The metrics port: a bounded HTTP/1.x listener answering `/metrics` (the text of `render`),
//! `/healthz` (the supervisor loop is alive) and `/readyz` (enough workers ready).

use super::{Shared, render};
use prometheus_client::encoding::prometheus_text;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// At most this many connections are open at once on the metrics port.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request head within this long, and take the answer within as
/// long again; then it is disconnected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A request head is at most this long.
const MAX_HEAD: usize = 8192;

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
