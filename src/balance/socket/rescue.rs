//! Rescue: the connections queued on a dead worker's socket, where the kernel cannot move them.
//! (The same for a slot a scale removed, once its worker is gone: `slots::close_leaving`.)
//!
//! When a slot's worker dies, the connections already in its socket's accept queue belong to
//! that socket. With migration (the eBPF program's, or `net.ipv4.tcp_migrate_req`) the kernel
//! moves them to another socket of the group as corepool takes the dead one out; without it
//! (no eBPF capabilities and the setting 0 or read-only: a default Docker container) they would
//! wait for the slot's next process, as long as a restart takes (p99 ~200 ms for hello under
//! `bench/run.py --restart`, seconds for an app that starts slowly).
//!
//! Instead corepool accepts them itself (it holds every slot's socket), takes the socket out of
//! the group, and relays each one to the group's address, where the kernel hands it to a
//! ready worker, as proxy mode would (`relay`). The app sees these few connections come from
//! the address corepool connected from (the public address's host, 127.0.0.1 on loopback), not
//! from the client. Each relay ends with its connection or after `IDLE_TIMEOUT` without a byte.
//!
//! The relays are bounded as proxy mode's are: at most as many at once as the descriptor
//! limit holds beside corepool's reserve (`limits`), and at most `AT_MOST` from one socket;
//! what does not fit is reset by the shutdown, as it would be without the rescue.

use crate::relay;
use nix::sys::socket::{self, SockFlag};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Most connections taken from one socket at a time (a listen backlog's worth).
const AT_MOST: usize = 4096;

/// A rescued connection on which no byte moved this long is closed (proxy mode's default
/// `--idle-timeout`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Rescue relays running now, in every pool of this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// How many more connections may be rescued now, with `slots` worker slots in the pool: what
/// the descriptor limit holds beside corepool's reserve, less the relays running, at most
/// `AT_MOST`.
pub(super) fn room(slots: usize) -> usize {
    let nofile = crate::limits::nofile().unwrap_or(1024);
    crate::limits::auto_max_connections(nofile, slots)
        .saturating_sub(LIVE.load(Ordering::Relaxed))
        .min(AT_MOST)
}

/// One rescue relay while it runs.
struct Live;

impl Live {
    fn new() -> Live {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts what is queued on `listener` now, without waiting, at most `room` (see [`room`]):
/// the accepted sockets, non-blocking and close-on-exec. The listener's own flags are left as
/// they are (its next worker may expect a blocking socket): each accept is made only after
/// poll(2) said one is there.
pub(super) fn take_queued(listener: &OwnedFd, room: usize) -> Vec<OwnedFd> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut taken = Vec::new();
    while taken.len() < room {
        let mut polled = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut polled, PollTimeout::ZERO) {
            Ok(1..) => {}
            Ok(_) => break,
            Err(err) => {
                tracing::warn!("rescue: cannot poll a dead worker's socket: {err}");
                break;
            }
        }
        match socket::accept4(listener, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => taken.push(fd),
            // The client gave up meanwhile; look again.
            Err(nix::errno::Errno::ECONNABORTED) => {}
            Err(err) => {
                tracing::warn!("rescue: cannot accept from a dead worker's socket: {err}");
                break;
            }
        }
    }
    taken
}

/// Accepts what is queued on `socket` before its shutdown would reset it, at most `room`;
/// says how many are left to be reset. `who` names the slot in the log ("worker 3").
pub(super) fn take_before_shutdown(socket: &OwnedFd, room: usize, who: &str) -> Vec<OwnedFd> {
    let taken = take_queued(socket, room);
    if let Ok(left @ 1..) = super::slots::queued(socket) {
        tracing::warn!(
            "{who}: {left} connection(s) queued on its socket are reset: corepool relays at \
             most {room} more at once (descriptors)"
        );
    }
    taken
}

/// Relays what [`take_before_shutdown`] took, once the socket is out of the group, saying so.
pub(super) fn relay_taken(connections: Vec<OwnedFd>, who: &str) {
    if connections.is_empty() {
        return;
    }
    tracing::info!(
        "{who}: {} connection(s) queued on its socket relayed to the other workers (no queue \
         migration here: no eBPF, net.ipv4.tcp_migrate_req 0)",
        connections.len()
    );
    relay_to_group(connections);
}

/// Relays each of `connections` to the address it was made to (the public port), where the
/// kernel picks a worker of the group; on the runtime corepool runs on. Without a runtime
/// (never, in the running pool) they are closed.
fn relay_to_group(connections: Vec<OwnedFd>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            "rescue: {} queued connection(s) of a dead worker closed (no runtime to relay them)",
            connections.len()
        );
        return;
    };
    for fd in connections {
        let live = Live::new();
        runtime.spawn(async move {
            let _live = live;
            if let Err(err) = relay_one(fd).await {
                tracing::debug!("rescue: a dead worker's queued connection: {err}");
            }
        });
    }
}

async fn relay_one(fd: OwnedFd) -> std::io::Result<()> {
    let client = std::net::TcpStream::from(fd);
    let address = client.local_addr()?;
    let client = tokio::net::TcpStream::from_std(client)?;
    let upstream = tokio::net::TcpStream::connect(address).await?;
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    relay::relay(
        &client,
        &upstream,
        Some(IDLE_TIMEOUT),
        &relay::Unanswered::default(),
    )
    .await
    .map(drop)
}
