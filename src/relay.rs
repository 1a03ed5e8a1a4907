//! Relay: the bytes of one proxied connection, client to worker and back, moved by splice(2).
//!
//! Each direction owns a pipe: splice(socket -> pipe) takes what the socket has (up to the
//! pipe's 64 KiB), splice(pipe -> socket) hands the same pages on, so the payload never enters
//! corepool's memory and is never copied through a user buffer. End of stream on one side
//! becomes shutdown(SHUT_WR) on the other (a half-close passes through: a client that stops
//! sending still gets its whole answer), and the relay ends when both directions have ended or
//! either fails. Nothing is interpreted, so WebSocket upgrades and large bodies pass intact.
//!
//! What splice bought, measured by `bench/relay.sh 3` on the 2-core test machine (one Node
//! worker behind `--balance proxy`, against the same server reached directly in the same run;
//! medians of 3), tokio's `copy_bidirectional` before and splice after:
//!
//! | figure                                  | copy      | splice    |
//! |-----------------------------------------|-----------|-----------|
//! | 2000 MiB download, of direct            | 0.20      | 0.39      |
//! | corepool CPU for that download          | 2.14 s    | 0.67 s    |
//! | 1 GB upload, of direct                  | 0.65      | 0.81      |
//! | corepool CPU for that upload            | 1.14 s    | 0.30 s    |
//! | hello keep-alive (wrk -c50), of direct  | 0.68      | 0.77      |
//! | new connection per request, of direct   | 0.73      | 0.67      |
//!
//! Bulk transfers cost a third of the CPU (CPU the workers get back) and go twice as fast;
//! short exchanges on a new connection each are the same within run-to-run spread (8.4k to
//! 9.0k requests/s in either build), the two pipe2(2) calls per connection being small beside
//! the accept, connect and the worker's own work. The pipes cost 4 descriptors per connection.

use nix::fcntl::{SpliceFFlags, splice};
use nix::sys::socket::{Shutdown, shutdown};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most bytes asked of one splice: the default capacity of a pipe.
const CHUNK: usize = 64 * 1024;

/// Relays between `client` and `worker` until both directions have ended; the bytes moved
/// each way, (client to worker, worker to client).
pub async fn relay(client: &TcpStream, worker: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(client, worker), one_way(worker, client))
}

/// Moves everything `from` sends to `to`, then half-closes `to`.
async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pipe_out, pipe_in) = pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
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
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(total),
                Err(err) => Err(err.into()),
            };
        }
        let mut left = n;
        while left > 0 {
            // The pipe holds `left` bytes, so a splice out of it can only wait for the socket.
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_out.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
        }
        total += n as u64;
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
        let relaying = tokio::spawn(async move { relay(&near, &far).await });
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
        assert_eq!(relaying.await.unwrap().unwrap(), (3_000_000, 6));
    }
}
