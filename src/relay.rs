//! Relay: the bytes of one proxied connection, client to worker and back, moved by splice(2).
//!
//! Each direction owns a pipe: splice(socket -> pipe) takes what the socket has (up to the
//! pipe's 64 KiB), splice(pipe -> socket) hands the same pages on, so the payload never enters
//! corepool's memory and is never copied through a user buffer. The client's end of stream
//! becomes shutdown(SHUT_WR) towards the worker (a half-close passes through: a client that
//! stops sending still gets its whole answer); the worker's end of stream, once its last bytes
//! are handed on, ends the relay and releases both sockets and both pipes at once (so a worker
//! dropping an idle keep-alive client frees everything corepool held for it). A relay also ends
//! when either side fails, or when no byte moved either way for the idle timeout. Nothing is
//! interpreted, so WebSocket upgrades and large bodies pass intact.
//!
//! The pipes cost 4 descriptors per connection. What splice bought over tokio's
//! `copy_bidirectional` (a third of the CPU, twice the bulk throughput) is measured in the
//! README's "Design notes" and `bench/results/relay-20261125.md`.

use nix::fcntl::{SpliceFFlags, splice};
use nix::sys::socket::{MsgFlags, Shutdown, recv, shutdown};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Most bytes asked of one splice: the default capacity of a pipe.
const CHUNK: usize = 64 * 1024;

/// Most unread client bytes discarded when the worker has closed (see [`relay`]).
const DISCARD_AT_MOST: usize = 256 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both sides sent end of stream: bytes moved (client to worker, worker to client).
    Closed { up: u64, down: u64 },
    /// The worker ended its side first; everything it sent was handed to the client, which got
    /// end of stream too, and the relay was released at once.
    ByWorker { up: u64, down: u64 },
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// When bytes last moved on a relay, either way.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last chunk moved.
    last: AtomicU64,
}

impl Activity {
    fn note(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// Relays between `client` and `worker` until it ends (see [`Ended`]), or until one side
/// fails.
///
/// A client's end of stream is passed on as a half-close (the worker still answers a client
/// that stopped sending). The worker's end of stream ends the relay as soon as what it sent is
/// handed to the client's socket: a worker that closed a connection (its keep-alive timeout,
/// a stop) must not leave corepool holding the client, two sockets and a pipe until that client
/// leaves. Client bytes already received but not yet read are discarded first (at most 256
/// KiB), so that closing the client's socket sends a FIN after the answer and not a reset in
/// front of it. With `idle_timeout`, a relay on which no byte moved for that long is closed.
pub async fn relay(
    client: &TcpStream,
    worker: &TcpStream,
    idle_timeout: Option<Duration>,
) -> io::Result<Ended> {
    let activity = Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
    };
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let moving = async {
        let up = one_way(client, worker, &activity, &up_bytes);
        let down = one_way(worker, client, &activity, &down_bytes);
        tokio::pin!(up, down);
        let by_worker = tokio::select! {
            result = &mut down => {
                result?;
                // `up` is dropped unfinished: its pipe is closed, and what it held was for a
                // worker that no longer reads.
                discard_unread(client);
                true
            }
            result = &mut up => {
                result?;
                down.await?;
                false
            }
        };
        let (up, down) = (
            up_bytes.load(Ordering::Relaxed),
            down_bytes.load(Ordering::Relaxed),
        );
        Ok(match by_worker {
            true => Ended::ByWorker { up, down },
            false => Ended::Closed { up, down },
        })
    };
    let Some(limit) = idle_timeout else {
        return moving.await;
    };
    let idle = async {
        // One timer per relay, re-armed only when it fires early.
        loop {
            let deadline = activity.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        ended = moving => ended,
        () = idle => Ok(Ended::Idle),
    }
}

/// Reads and drops what the client sent that nobody will read, without waiting for more.
fn discard_unread(client: &TcpStream) {
    let mut buf = [0u8; 4096];
    let mut dropped = 0;
    while dropped < DISCARD_AT_MOST {
        match recv(client.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(_) => return,
            Ok(n) => dropped += n,
        }
    }
}

/// Moves everything `from` sends to `to`, then half-closes `to`. Each chunk moved is counted
/// in `moved` and noted in `activity`.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    moved: &AtomicU64,
) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so a splice into it can only wait for the socket.
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe_in.as_fd(), None, CHUNK, flags)
                    .map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            return match shutdown(to.as_raw_fd(), Shutdown::Write) {
                // The other side is already gone: nothing left to tell it.
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
                Err(err) => Err(err.into()),
            };
        }
        activity.note();
        let mut left = n;
        while left > 0 {
            // The pipe holds `left` bytes, so a splice out of it can only wait for the socket.
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_out.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
            activity.note();
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A pipe for one direction: (read end, write end), non-blocking and close-on-exec (a worker
/// started later must not inherit it).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client <-> [near | relay | far] <-> server: bytes arrive intact both ways, and a
    /// half-close from the client still lets the server's answer through.
    #[tokio::test]
    async fn relays_both_ways_and_passes_a_half_close() {
        let (mut client, near) = pair().await;
        let (far, mut server) = pair().await;
        let relaying = tokio::spawn(async move { relay(&near, &far, None).await });
        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == request, "request corrupted ({} bytes)", got.len());
        server.write_all(b"thanks").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"thanks");
        assert_eq!(
            relaying.await.unwrap().unwrap(),
            Ended::Closed {
                up: 3_000_000,
                down: 6
            }
        );
    }
}
