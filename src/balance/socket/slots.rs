//! Socket mode's record of its slots: each slot's processes, which are ready, whether corepool
//! took its socket out of the group, and the sockets of slots a scale removed until they can be
//! closed; with the socket queries (listening, queue length) and the tcp_migrate_req setting
//! that decide when a socket may leave the group.

use super::steering::GroupSteering;
use crate::balance::ports::OurSockets;
use nix::sys::socket;
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Socket mode: the sockets of a slot a scale removed, kept until its processes are gone (they
/// may still accept what is queued there), then closed.
pub(super) struct Leaving {
    pub(super) slot: usize,
    pub(super) pids: HashSet<i32>,
    /// The public port's socket first, then the further ports'.
    pub(super) sockets: Vec<OwnedFd>,
}

/// Socket mode: a slot's processes (group leaders), the ready ones, and whether corepool took
/// its socket out of the group (and the steering's map) since it was last ready.
#[derive(Default)]
pub(super) struct SlotState {
    pub(super) live: HashSet<i32>,
    pub(super) ready: HashSet<i32>,
    pub(super) out: bool,
}

/// Whether a socket listens (SO_ACCEPTCONN); false when that cannot be read.
pub(super) fn accepting(socket: &OwnedFd) -> bool {
    socket::getsockopt(socket, socket::sockopt::AcceptConn).unwrap_or(false)
}

#[derive(Default)]
pub(super) struct SlotTable {
    pub(super) slots: Vec<SlotState>,
    /// The ready slots the steering deals to, as last written.
    pub(super) steered: Vec<u32>,
    /// Removed slots' sockets, until their processes are gone.
    pub(super) leaving: Vec<Leaving>,
}

impl SlotTable {
    /// Closes the sockets of removed slots whose processes are all gone. Shut down first, so
    /// that a descendant still holding a copy cannot keep it listening; what is queued moves
    /// to the other sockets when the kernel may migrate it, else it is reset (said once).
    pub(super) fn close_leaving(
        &mut self,
        ours: &OurSockets,
        migrate: bool,
        steering: &GroupSteering,
    ) {
        let (done, kept): (Vec<Leaving>, Vec<Leaving>) = std::mem::take(&mut self.leaving)
            .into_iter()
            .partition(|l| l.pids.is_empty());
        self.leaving = kept;
        for leaving in done {
            let slot = leaving.slot;
            let mut ours = ours
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Without migration the shutdown would reset what is queued (with the kernel's
            // hash the socket kept getting connections while its worker drained): corepool
            // accepts it first and relays it to the group, as for a dead slot (`rescue`).
            let mut rescued = Vec::new();
            for socket in &leaving.sockets {
                if !migrate && let Ok(1..) = queued(socket) {
                    let room = super::rescue::room(self.slots.len()).saturating_sub(rescued.len());
                    let who = format!("worker {slot} removed");
                    rescued.extend(super::rescue::take_before_shutdown(socket, room, &who));
                }
                let listened = accepting(socket);
                match socket::shutdown(socket.as_raw_fd(), socket::Shutdown::Read) {
                    Ok(()) if listened => steering.left(socket),
                    Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {}
                    Err(err) => {
                        tracing::warn!("worker {slot} removed: cannot shut its socket down: {err}")
                    }
                }
                if let Ok(st) = nix::sys::stat::fstat(socket) {
                    ours.remove(&st.st_ino);
                }
            }
            tracing::debug!("worker {slot} removed: its sockets are closed");
            super::rescue::relay_taken(rescued, &format!("worker {slot} removed"));
        }
    }
}

/// Connections waiting in a listening socket's accept queue (`tcpi_unacked` of a listener).
pub(super) fn queued(socket: &OwnedFd) -> io::Result<u32> {
    crate::relay::tcp_info(socket).map(|info| info.tcpi_unacked)
}

const MIGRATE_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// The inits that run a container's one program as their child: tini (`docker run --init`
/// installs it as docker-init), podman's catatonit, dumb-init.
const CONTAINER_INITS: &[&str] = &["tini", "docker-init", "catatonit", "dumb-init"];

/// Whether corepool is its container's program: PID 1, or the child of a container init that
/// is PID 1 (its name read from /proc/1/comm).
fn container_program() -> bool {
    if std::process::id() == 1 {
        return true;
    }
    nix::unistd::getppid().as_raw() == 1
        && std::fs::read_to_string("/proc/1/comm")
            .is_ok_and(|comm| CONTAINER_INITS.contains(&comm.trim()))
}

/// Lets the kernel move the connections queued on a listener that stops listening to another
/// listener of its reuseport group (net.ipv4.tcp_migrate_req, this network namespace only),
/// instead of resetting them. Whether that is on, and how it came to be, for the log.
///
/// Only the container's own program sets it: corepool as PID 1, or as the one child of a
/// container init (`docker run --init`'s tini, podman's catatonit, dumb-init) that is PID 1;
/// then the network namespace is the container's (or the pod's, whose other containers gain
/// from it too). Started by hand on a host (PID 1 is systemd or another system init), corepool
/// leaves the host's setting alone and says how to turn it on.
pub(super) fn enable_migration() -> (bool, String) {
    let may_set = container_program();
    match std::fs::read_to_string(MIGRATE_SYSCTL) {
        Ok(text) if text.trim() != "0" => (
            true,
            "a dead worker's queued connections move to another (tcp_migrate_req)".into(),
        ),
        Ok(_) if !may_set => (
            false,
            "net.ipv4.tcp_migrate_req is 0 and corepool is neither PID 1 nor a container \
             init's child, so it leaves this \
             network namespace's setting alone: a dead worker's queued connections wait for its \
             restart (sysctl -w net.ipv4.tcp_migrate_req=1 to move them)"
                .into(),
        ),
        Ok(_) => match std::fs::write(MIGRATE_SYSCTL, "1\n") {
            Ok(()) => (
                true,
                "net.ipv4.tcp_migrate_req set to 1 in this network namespace, so that a dead \
                 worker's queued connections move to another"
                    .into(),
            ),
            Err(err) => (
                false,
                format!(
                    "net.ipv4.tcp_migrate_req is 0 and cannot be set ({err}): a dead worker's \
                     queued connections wait for its restart (docker run --sysctl \
                     net.ipv4.tcp_migrate_req=1)"
                ),
            ),
        },
        Err(err) => (
            false,
            format!("no net.ipv4.tcp_migrate_req ({err}; Linux 5.14 or later has it)"),
        ),
    }
}
