//! Steer: new connections go to the slots' SO_REUSEPORT sockets in turn.
//!
//! Without help the kernel picks a socket of the group by a hash of each connection's
//! addresses, so N long-lived connections split binomially (see the README's "Benchmarks"):
//! one worker idle part of the time while the other queued. A
//! small eBPF program attached to the group (`SO_ATTACH_REUSEPORT_EBPF`) instead takes a counter
//! from an array map, adds one, and selects the socket of the `counter % ready`-th *ready* slot
//! (an order map lists them) from a `REUSEPORT_SOCKARRAY` map (`bpf_sk_select_reuseport`):
//! round robin, as pm2's primary does, without a process in the data path. The balancer keeps
//! the list current: a slot whose worker is dead, restarting, stopping or not ready yet is
//! left out, so its socket's backlog receives nothing new. The counter is read and written
//! without an atomic operation, so two CPUs taking a SYN at the same instant may pick the same
//! socket; that costs a little evenness, never a connection.
//!
//! When no slot is ready, or the program cannot select (the slot's socket stopped listening or
//! was closed), it passes, and the kernel's hash chooses among the listening sockets. Where the
//! kernel allows (5.14+), the program is loaded as `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`: it
//! also chooses the ready slot that takes over the connections queued on a socket that stops
//! listening (a dead worker's), which the kernel then moves instead of resetting them, with
//! `net.ipv4.tcp_migrate_req` 0 too. Loading
//! it needs CAP_BPF with CAP_NET_ADMIN, or CAP_SYS_ADMIN: root on a machine, but not what a
//! container gets by default. Without them corepool says so once at start-up and the kernel's
//! hash spreads connections (see `balance` for how not-ready slots leave the group then).
//!
//! `--sticky ip` replaces the turn by a hash of the connection's source address (IPv4 or
//! IPv6, read from the IP header with `bpf_skb_load_bytes_relative`): the address's own slot
//! (`hash % slots`) while it is ready, else a ready slot picked by the rest of the hash
//! (`sticky_program`; proxy mode makes the same choice, `proxy::address_hash`). Where eBPF may
//! not be loaded, [`Classic`] does the same with a classic BPF program, which needs no
//! privilege but can only name a position in the kernel's array of the group's sockets.
//!
//! The programs are a few instructions, written out below rather than compiled from C, so the
//! build needs no BPF toolchain and nothing is loaded that is not in this file.
//!
//! Layout: this module holds [`Steering`] (attaching it, the ready set, rejoin, redeal,
//! resize); `ebpf` the eBPF programs and the bpf(2) calls that load them and fill their maps;
//! `cbpf` the classic-BPF fallback for `--sticky ip` and its model of the group's order.

mod cbpf;
mod ebpf;

pub use cbpf::{Classic, classic};

use ebpf::{BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, SO_ATTACH_REUSEPORT_EBPF};
use ebpf::{create_map, load, program, sticky_program, update};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// How connections are dealt: in turn, or by source address (`--sticky ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deal {
    Turn,
    Sticky,
}

/// The steering attached to a socket group; kept for the pool's lifetime.
pub enum Steering {
    /// The eBPF program and its maps.
    Ebpf {
        _program: OwnedFd,
        state: OwnedFd,
        order: OwnedFd,
        sockets: OwnedFd,
        /// The pool's slots now (`--sticky ip` hashes over them).
        slots: u32,
        /// The most slots the maps hold; the ready flags start at this index of `order`.
        capacity: u32,
        deal: Deal,
        /// The program also picks where a stopped listener's queued connections go.
        migrates: bool,
    },
    /// `--sticky ip` without eBPF: a classic BPF program, rewritten on every change.
    Classic(Classic),
}

/// Attaches round-robin steering to the group formed by `sockets` (listening, SO_REUSEPORT,
/// same address), socket `i` being slot `i`'s. Every slot starts ready (in the order). The maps
/// hold up to `capacity` slots, so that a scale can add sockets later (`rejoin`, `resize`).
pub fn round_robin(sockets: &[&OwnedFd], capacity: u32) -> io::Result<Steering> {
    ebpf(sockets, Deal::Turn, capacity)
}

/// Attaches eBPF steering that deals by `deal` to the group formed by `sockets`, as
/// [`round_robin`] does.
pub fn ebpf(sockets: &[&OwnedFd], deal: Deal, capacity: u32) -> io::Result<Steering> {
    let slots = u32::try_from(sockets.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| io::Error::other("no sockets to steer"))?;
    let capacity = capacity.max(slots);
    let state = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 2)?;
    // The ready slots in order, then each slot's ready flag (from `capacity` on).
    let order = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 2 * capacity)?;
    let group = create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, capacity)?;
    for (i, socket) in sockets.iter().enumerate() {
        update(&group, i as u32, socket.as_raw_fd() as u64)?;
    }
    let (s, o, g) = (state.as_raw_fd(), order.as_raw_fd(), group.as_raw_fd());
    let (program, migrates) = load(&match deal {
        Deal::Turn => program(s, o, g),
        Deal::Sticky => sticky_program(s, o, g, slots, capacity),
    })?;
    let fd: libc::c_int = program.as_raw_fd();
    let steering = Steering::Ebpf {
        _program: program,
        state,
        order,
        sockets: group,
        slots,
        capacity,
        deal,
        migrates,
    };
    steering.set_ready(&(0..slots).collect::<Vec<_>>(), &[], &[])?;
    attach(sockets[0], SO_ATTACH_REUSEPORT_EBPF, &fd)?;
    Ok(steering)
}

/// setsockopt(SOL_SOCKET, `option`, `value`) on `socket`.
fn attach<T>(socket: &OwnedFd, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live value of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Steering {
    /// Deals new connections to these slots only (in turn, or by address); to none (the
    /// kernel's hash over the group decides) when the list is empty. The order is written
    /// before the count, so a connection steered in between finds a slot that is, or just
    /// was, ready. `sockets` (each slot's, None once closed) matter to the classic program.
    /// `leaving`: sockets of slots a scale removed, still in the group until they are closed.
    pub fn set_ready(
        &self,
        ready: &[u32],
        sockets: &[Option<OwnedFd>],
        leaving: &[&OwnedFd],
    ) -> io::Result<()> {
        match self {
            Steering::Ebpf {
                state,
                order,
                slots,
                capacity,
                ..
            } => {
                for (i, &slot) in ready.iter().enumerate() {
                    update(order, i as u32, u64::from(slot))?;
                }
                for slot in 0..*slots {
                    update(order, capacity + slot, u64::from(ready.contains(&slot)))?;
                }
                update(state, 1, ready.len() as u64)
            }
            Steering::Classic(classic) => classic.set_ready(ready, sockets, leaving),
        }
    }

    /// Puts `socket` back as slot `slot`'s after it listens again (a socket that stops
    /// listening leaves the map).
    pub fn rejoin(&self, slot: u32, socket: &OwnedFd) -> io::Result<()> {
        match self {
            Steering::Ebpf { sockets, .. } => update(sockets, slot, socket.as_raw_fd() as u64),
            // Seen by the next set_ready.
            Steering::Classic(_) => Ok(()),
        }
    }

    /// Deals by `deal` from now on: the eBPF program replaced in place, its maps kept (a
    /// socket can be in one socket map only). `socket`: one in the group. On failure nothing
    /// changed.
    pub fn redeal(&mut self, deal: Deal, socket: &OwnedFd) -> io::Result<()> {
        let Steering::Ebpf {
            _program: current,
            state,
            order,
            sockets,
            slots,
            capacity,
            deal: dealt,
            migrates,
        } = self
        else {
            return Err(io::Error::other("not an eBPF steering"));
        };
        let (s, o, g) = (state.as_raw_fd(), order.as_raw_fd(), sockets.as_raw_fd());
        let (program, migrating) = load(&match deal {
            Deal::Turn => program(s, o, g),
            Deal::Sticky => sticky_program(s, o, g, *slots, *capacity),
        })?;
        attach(socket, SO_ATTACH_REUSEPORT_EBPF, &program.as_raw_fd())?;
        *current = program;
        *dealt = deal;
        *migrates = migrating;
        Ok(())
    }

    /// The pool now has `slots` slots (a scale). eBPF: the ready flags of the slots added or
    /// removed are cleared (a new slot is dealt to once it is ready), and the sticky program,
    /// which hashes over the slot count, is loaded again for the new count (attached through
    /// `socket`, one listening in the group). Classic: the next `set_ready` writes the program
    /// for the new count.
    pub fn resize(&mut self, new: u32, socket: Option<&OwnedFd>) -> io::Result<()> {
        match self {
            Steering::Ebpf {
                order,
                slots,
                capacity,
                deal,
                ..
            } => {
                if new > *capacity {
                    return Err(io::Error::other(format!(
                        "{new} slots: the steering holds {capacity}"
                    )));
                }
                let old = *slots;
                for slot in old.min(new)..old.max(new) {
                    update(order, *capacity + slot, 0)?;
                }
                if old == new || *deal == Deal::Turn {
                    *slots = new;
                    return Ok(());
                }
                let socket = socket.ok_or_else(|| io::Error::other("no socket listens"))?;
                *slots = new;
                if let Err(err) = self.redeal(Deal::Sticky, socket) {
                    if let Steering::Ebpf { slots, .. } = self {
                        *slots = old;
                    }
                    return Err(err);
                }
                Ok(())
            }
            Steering::Classic(classic) => {
                classic.slots = new;
                Ok(())
            }
        }
    }

    /// Whether the program also chooses where the connections queued on a listener that stops
    /// go (Linux 5.14+): then the kernel moves them to a ready slot instead of resetting them,
    /// whatever `net.ipv4.tcp_migrate_req` says.
    pub fn migrates(&self) -> bool {
        matches!(self, Steering::Ebpf { migrates: true, .. })
    }

    /// Whether `set_ready` must be called on every change of the group, not only of the
    /// ready slots (the classic program).
    pub fn follows_group(&self) -> bool {
        matches!(self, Steering::Classic(_))
    }

    /// `socket` just stopped listening (shutdown): it left the group.
    pub fn left(&self, socket: &OwnedFd) {
        if let Steering::Classic(classic) = self {
            classic.left(socket);
        }
    }
}
