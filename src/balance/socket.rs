//! Socket mode (the default): corepool binds the public port once per slot, before any worker
//! starts, and hands the slot's listening socket to its worker as fd 3 with the systemd
//! socket-activation variables. The kernel balances connections; nothing of ours sits in the
//! data path. An unmodified Node server adopts the socket through the preload (`node`).
//!
//! ## One SO_REUSEPORT socket per slot, not one shared socket
//! Under CPU contention one shared socket spreads badly: every worker's epoll wakes for each
//! connection and whichever is scheduled first accepts all that are queued, so one worker took
//! 73% (tests/port.rs, run beside the other test files; the measurements are in the README's
//! design notes). With SO_REUSEPORT the kernel hashes each connection to one socket of the
//! group: the spread no longer depends on scheduling luck. Where corepool may load eBPF,
//! `steer` replaces the hash with a round robin, so that a few long-lived connections (an
//! ingress's keep-alive pool) are dealt evenly too, instead of binomially.
//!
//! ## A slot that is not ready takes no new connection
//! A socket of the group takes its share of new connections whether or not a process accepts
//! on it, so a dead, restarting or crash-looping worker's connections would wait in its
//! socket's backlog (or hang until the slot is given up). Two measures keep them out:
//! - With eBPF steering, `steer` deals connections to the *ready* slots only; this module
//!   updates that list whenever a worker becomes ready, is stopped or exits.
//! - When a slot has no live process while another slot is ready, corepool shuts its socket
//!   down (`shutdown(SHUT_RD)` on a listener): it leaves the reuseport group, and the kernel's
//!   hash (or the program) only sees the others. The slot's next Node worker re-joins the
//!   group itself when it listens (libuv calls `listen()` on the descriptor it adopts), so its
//!   socket is back just as it becomes ready; for another program corepool calls `listen()`
//!   before starting it (such a program may accept at once), and for every worker when it
//!   becomes ready. Connections already queued on the socket are moved to another listener
//!   of the group when `net.ipv4.tcp_migrate_req` is 1 (Linux 5.14; per network namespace):
//!   corepool sets it at start when it may, and says so. Where it may not (a read-only
//!   /proc/sys), a socket with connections queued stays in the group for the slot's next
//!   process rather than have them reset.
//!
//! A slot given up for good has its socket closed, so nothing waits for it forever. When no
//! slot is ready (all restarting), the sockets stay in the group and connections wait in the
//! backlogs; none is refused (tests/reliability.rs kills workers at random under load).
//!
//! ## Scaling
//! `corepool scale` and the CPU follow change the slot count (`resize`). A new slot's socket is
//! bound but not listening, as a taken-out one: its Node worker's `listen()` joins it to the
//! group (another program's socket listens just before it starts), and the steering deals to
//! it once it is ready. The eBPF maps are made for `scale::MAX_WORKERS` slots, so new sockets
//! fit; a pool started with one slot sets up steering and migration at its first scale up. A
//! removed slot's sockets are kept (`Leaving`) until its processes are gone, then shut down and
//! closed: what is still queued moves to another socket with tcp_migrate_req, else is reset.
//!
//! ## Launchers
//! The server may run behind a launcher (`npm start`, yarn, pnpm, npx, dotenv-cli, tsx, a Node
//! wrapper): it is a child or grandchild of the worker, and Node gives a child no descriptor above
//! 2 unless asked. The preload in the launcher (Node too) hands fd 3 and 4 on to the children it
//! starts (see `preload/adopt.cjs`). So that no process mistakes another descriptor at 3 or 4 (a
//! node:cluster worker's IPC channel, a launcher's epoll descriptor) for these, each worker gets
//! their inode numbers (`COREPOOL_LISTEN_INODE`, `COREPOOL_READY_INODE`), and the preload uses a
//! descriptor only when fstat shows a socket, or a pipe, with that inode.
//!
//! ## More than one port
//! `--port 3000,4041`: each further port gets a group of its own (`share_ports`, one
//! SO_REUSEPORT socket per slot, refused like the first when another process listens there),
//! handed over after the first at fds 4.. (LISTEN_FDS, LISTEN_FDNAMES=port-3000:port-4041) and
//! named to the preload as `COREPOOL_EXTRA_PORTS=port:fd:inode,...`; the readiness pipe comes
//! after them. Readiness, the eBPF turn and the port watch concern the first port only; the
//! kernel's hash spreads the others, whose sockets stay listening for the pool's lifetime (a
//! given-up slot's are closed).

use super::ports::{OurSockets, bind_group, bind_only, bind_public, socket_inodes, watch_port};
use crate::launch::WorkerIo;
use crate::launch::above_ten;
use crate::metrics::Shared;
use crate::readiness::ReadyPipe;
use crate::steer;
use nix::sys::socket;
use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Descriptor numbers in the worker.
const LISTEN_FD: RawFd = 3;
const READY_FD: RawFd = 4;

/// Socket mode's state: the slots' sockets and what corepool knows of them.
pub struct SocketMode {
    host: IpAddr,
    port: u16,
    /// One SO_REUSEPORT listening socket per slot, handed to that slot's worker.
    slot_sockets: Vec<Option<OwnedFd>>,
    /// Round-robin steering over the slot sockets, when the kernel allows it.
    steering: Option<steer::Steering>,
    /// Each slot's processes and whether its socket is in the group.
    slot_table: std::sync::Mutex<SlotTable>,
    /// The kernel moves a closed listener's queued connections to another.
    migrate: bool,
    /// The workers are Node, which calls `listen()` on the socket it adopts.
    pub node_workers: bool,
    /// How connections are spread over the slots, for the start-up log.
    pub spread: String,
    /// The watch for foreign listeners on the public port.
    port_watch: Option<tokio::task::JoinHandle<()>>,
    /// A worker is ready once it calls process.send('ready') (`--ready-on message`), not once
    /// it listens.
    pub ready_on_message: bool,
    /// The ports after the first (`--port 3000,4041`), each with one SO_REUSEPORT socket per
    /// slot, handed over at fds 4.. (spread by the kernel's hash, no steering).
    extra_ports: Vec<(u16, Vec<Option<OwnedFd>>)>,
    /// The inodes of our sockets on the public port, for the port watch.
    ours: OurSockets,
    /// Steering and migration were tried (a pool of one tries at its first scale up).
    group_tried: bool,
    /// `--sticky ip`: the steering deals by client address.
    sticky: bool,
}

impl SocketMode {
    /// Binds the group on the first port (refused when another process listens there), and
    /// sets up the steering and the migration of queued connections.
    pub fn bind(host: IpAddr, port: u16, slots: usize) -> Result<SocketMode, String> {
        let slot_sockets = bind_group(host, port, slots)?;
        let (steering, mut spread) = match slot_sockets.len() {
            0 | 1 => (None, String::new()),
            _ => {
                let group: Vec<&OwnedFd> = slot_sockets.iter().flatten().collect();
                match steer::round_robin(&group, crate::scale::MAX_WORKERS as u32) {
                    Ok(steering) => (Some(steering), "connections in turn (eBPF)".to_string()),
                    Err(err) => (
                        None,
                        format!("connections by the kernel's hash (no eBPF round robin: {err})"),
                    ),
                }
            }
        };
        let migrate = slot_sockets.len() > 1 && {
            let (migrate, how) = enable_migration();
            spread.push_str("; ");
            spread.push_str(&how);
            migrate
        };
        let slot_table = SlotTable {
            slots: (0..slot_sockets.len())
                .map(|_| SlotState::default())
                .collect(),
            steered: (0..slot_sockets.len() as u32).collect(),
            leaving: Vec::new(),
        };
        let ours = Arc::new(std::sync::Mutex::new(socket_inodes(
            slot_sockets.iter().flatten(),
        )));
        let group_tried = slot_sockets.len() > 1;
        Ok(SocketMode {
            host,
            port,
            slot_sockets,
            steering,
            slot_table: std::sync::Mutex::new(slot_table),
            migrate,
            node_workers: false,
            spread,
            port_watch: None,
            ready_on_message: false,
            extra_ports: Vec::new(),
            ours,
            group_tried,
            sticky: false,
        })
    }

    /// Binds a group of per-slot sockets on each further port of `--port` (the first is bound
    /// by `bind`), refusing a port another process listens on, as for the first.
    pub fn share_ports(&mut self, extra: &[u16]) -> Result<(), String> {
        for &port in extra {
            let group = bind_group(self.host, port, self.slot_sockets.len())?;
            self.extra_ports.push((port, group));
        }
        Ok(())
    }

    /// The slot's sockets, the socket-activation variables and the readiness pipe.
    pub fn handover(
        &self,
        slot: usize,
        io: &mut WorkerIo,
        ready_pipe: &mut Option<ReadyPipe>,
    ) -> io::Result<()> {
        if let Some(Some(listener)) = self.slot_sockets.get(slot) {
            if !self.node_workers {
                self.with_slots(|table| self.relisten(table, slot));
            }
            io.fds.push((listener.as_raw_fd(), LISTEN_FD));
            // The further ports follow at 4.. (systemd's order: LISTEN_FDS of them
            // from fd 3), named in COREPOOL_EXTRA_PORTS as port:fd:inode for the
            // preload; the readiness pipe comes after them.
            let mut extra = Vec::new();
            let mut next_fd = LISTEN_FD + 1;
            for (port, group) in &self.extra_ports {
                let Some(Some(socket)) = group.get(slot) else {
                    continue;
                };
                let inode = nix::sys::stat::fstat(socket)
                    .map_err(io::Error::from)?
                    .st_ino;
                io.fds.push((socket.as_raw_fd(), next_fd));
                extra.push((*port, next_fd, inode));
                next_fd += 1;
            }
            let ready_fd = next_fd.max(READY_FD);
            io.env
                .push(("LISTEN_FDS".into(), (1 + extra.len()).to_string()));
            let names = if extra.is_empty() {
                "corepool".to_string()
            } else {
                std::iter::once(format!("port-{}", self.port))
                    .chain(extra.iter().map(|(port, _, _)| format!("port-{port}")))
                    .collect::<Vec<_>>()
                    .join(":")
            };
            io.env.push(("LISTEN_FDNAMES".into(), names));
            if !extra.is_empty() {
                let text = extra
                    .iter()
                    .map(|(port, fd, inode)| format!("{port}:{fd}:{inode}"))
                    .collect::<Vec<_>>()
                    .join(",");
                io.env.push(("COREPOOL_EXTRA_PORTS".into(), text));
            }
            io.env
                .push(("COREPOOL_LISTEN_FD".into(), LISTEN_FD.to_string()));
            io.env
                .push(("COREPOOL_PUBLIC_PORT".into(), self.port.to_string()));
            io.env.push(("PORT".into(), self.port.to_string()));
            io.listen_pid = true;
            let pipe = ReadyPipe::open()?;
            io.fds.push((pipe.write.as_raw_fd(), ready_fd));
            io.env
                .push(("COREPOOL_READY_FD".into(), ready_fd.to_string()));
            // The preload uses fd 3 and 4 only when they are these very objects (a
            // launcher's child, a node:cluster worker has other things there).
            for (name, fd) in [
                ("COREPOOL_LISTEN_INODE", listener),
                ("COREPOOL_READY_INODE", &pipe.write),
            ] {
                let inode = nix::sys::stat::fstat(fd).map_err(io::Error::from)?.st_ino;
                io.env.push((name.into(), inode.to_string()));
            }
            let ready_on = if self.ready_on_message {
                "message"
            } else {
                "listen"
            };
            io.env.push(("COREPOOL_READY_ON".into(), ready_on.into()));
            *ready_pipe = Some(pipe);
        }
        Ok(())
    }

    /// A worker of `slot` started: it holds the slot's socket.
    pub fn started(&self, slot: usize, pid: i32) {
        self.with_slots(|table| {
            if let Some(state) = table.slots.get_mut(slot) {
                state.live.insert(pid);
            }
        });
    }

    /// Watches the public port for listeners that are not the pool's, and reports them
    /// through /readyz (once, in the runtime).
    pub fn watch_port(&mut self, shared: Arc<Shared>) {
        if self.port_watch.is_none() {
            let ours = self.ours.clone();
            self.port_watch = Some(tokio::spawn(watch_port(self.host, self.port, ours, shared)));
        }
    }

    /// A slot given up for good: close its socket, so the kernel stops queueing connections
    /// for a worker that will never come (what was queued there is reset; clients retry).
    pub fn abandon(&mut self, slot: usize) {
        if let Some(socket) = self.slot_sockets.get_mut(slot) {
            *socket = None;
        }
        for (_, group) in &mut self.extra_ports {
            if let Some(socket) = group.get_mut(slot) {
                *socket = None;
            }
        }
        self.with_slots(|table| {
            if let Some(state) = table.slots.get_mut(slot) {
                *state = SlotState {
                    out: true,
                    ..SlotState::default()
                };
            }
            self.settle(table);
        });
    }

    /// A worker became ready: its slot's socket is (back) in the group.
    pub fn worker_ready(&self, pid: i32) {
        self.with_slots(|table| {
            let Some(slot) = table.slots.iter().position(|s| s.live.contains(&pid)) else {
                return;
            };
            table.slots[slot].ready.insert(pid);
            self.relisten(table, slot);
            self.settle(table);
        });
    }

    /// The worker is stopping or gone: no slot counts it as ready.
    pub fn forget(&self, pid: i32) {
        self.with_slots(|table| {
            for state in &mut table.slots {
                state.ready.remove(&pid);
            }
            self.settle(table);
        });
    }

    /// A worker process (its group's leader) exited: it no longer holds its slot's socket.
    pub fn exited(&self, pid: i32) {
        self.with_slots(|table| {
            for state in &mut table.slots {
                state.live.remove(&pid);
            }
            for leaving in &mut table.leaving {
                leaving.pids.remove(&pid);
            }
        });
    }

    fn with_slots<T>(&self, f: impl FnOnce(&mut SlotTable) -> T) -> T {
        let mut table = self
            .slot_table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut table)
    }

    /// Puts a slot's socket back into the group (and the steering's socket map) if corepool
    /// took it out.
    fn relisten(&self, table: &mut SlotTable, slot: usize) {
        let (Some(Some(socket)), Some(state)) =
            (self.slot_sockets.get(slot), table.slots.get_mut(slot))
        else {
            return;
        };
        if !state.out {
            return;
        }
        // A Node worker has usually done so already (listen() again would only set the
        // backlog).
        if !accepting(socket)
            && let Err(err) = socket::listen(
                socket,
                socket::Backlog::new(1024).unwrap_or(socket::Backlog::MAXCONN),
            )
        {
            tracing::warn!("worker {slot}: cannot listen on its socket again: {err}");
            return;
        }
        state.out = false;
        if let Some(steering) = &self.steering
            && let Err(err) = steering.rejoin(slot as u32, socket)
        {
            tracing::warn!("worker {slot}: cannot steer connections to its socket again: {err}");
        }
    }

    /// Takes the sockets of slots without a live process out of the group while another
    /// slot is ready, and tells the steering which slots are ready.
    fn settle(&self, table: &mut SlotTable) {
        self.close_leaving(table);
        let n = table.slots.len().min(self.slot_sockets.len());
        let serving = |table: &SlotTable, s: usize| {
            self.slot_sockets[s].is_some()
                && !table.slots[s].out
                && !table.slots[s].ready.is_empty()
        };
        for s in 0..n {
            let Some(socket) = &self.slot_sockets[s] else {
                continue;
            };
            // Not `out` alone: a Node worker may have put it back before it died.
            if !table.slots[s].live.is_empty()
                || !accepting(socket)
                || !(0..n).any(|t| t != s && serving(table, t))
            {
                continue;
            }
            if !self.migrate {
                match queued(socket) {
                    Ok(0) => {}
                    // Kept for the slot's next process rather than reset.
                    Ok(_) => continue,
                    Err(err) => {
                        tracing::warn!("worker {s}: cannot read its socket's queue: {err}");
                        continue;
                    }
                }
            }
            match socket::shutdown(socket.as_raw_fd(), socket::Shutdown::Read) {
                Ok(()) => {
                    tracing::debug!("worker {s}: its socket leaves the group until it is ready");
                    table.slots[s].out = true;
                    if let Some(steering) = &self.steering {
                        steering.left(socket);
                    }
                }
                Err(err) => tracing::warn!("worker {s}: cannot take its socket out: {err}"),
            }
        }
        if let Some(steering) = &self.steering {
            let ready: Vec<u32> = (0..n)
                .filter(|&s| serving(table, s))
                .map(|s| s as u32)
                .collect();
            // The classic program names positions in the kernel's array of the group, which
            // moves when a socket leaves it even if the ready slots stay the same.
            if ready != table.steered || steering.follows_group() {
                let leaving: Vec<&OwnedFd> = table
                    .leaving
                    .iter()
                    .flat_map(|l| l.sockets.first())
                    .collect();
                match steering.set_ready(&ready, &self.slot_sockets, &leaving) {
                    Ok(()) => table.steered = ready,
                    Err(err) => tracing::warn!("cannot update the eBPF steering: {err}"),
                }
            }
        }
    }

    /// `--sticky ip`: the steering deals by a hash of the source address instead of in turn
    /// (the eBPF program replaced in place), or, where eBPF may not be loaded, a classic BPF
    /// program does (see `steer::Classic`).
    pub fn set_sticky(&mut self) {
        self.sticky = true;
        if self.slot_sockets.len() < 2 {
            // A pool of one: set up at its first scale up (`steer_group`).
            return;
        }
        let group: Vec<&OwnedFd> = self.slot_sockets.iter().flatten().collect();
        let ebpf = match &mut self.steering {
            Some(round_robin) => round_robin.redeal(steer::Deal::Sticky, group[0]),
            None => steer::ebpf(
                &group,
                steer::Deal::Sticky,
                crate::scale::MAX_WORKERS as u32,
            )
            .map(|s| self.steering = Some(s)),
        };
        let (steering, spread) = match ebpf {
            Ok(()) => (None, "connections by client address (eBPF)".to_string()),
            // Replaces the round robin, if any, in the kernel too (one program per group).
            Err(err) => match steer::classic(&group) {
                Ok(steering) => (
                    Some(steering),
                    format!("connections by client address (classic BPF; no eBPF: {err})"),
                ),
                Err(classic) => {
                    tracing::warn!(
                        "--sticky ip: cannot steer by client address (no eBPF: {err}; no classic \
                         BPF: {classic}); connections are spread as without it"
                    );
                    return;
                }
            },
        };
        if let Some(steering) = steering {
            self.steering = Some(steering);
        }
        let tail = self
            .spread
            .split_once("; ")
            .map(|(_, tail)| format!("; {tail}"))
            .unwrap_or_default();
        self.spread = spread + &tail;
    }

    /// The pool now has `n` slots (`corepool scale`, the CPU follow). A new slot
    /// gets a socket of the group, bound but not listening (taken out, as a dead slot's is):
    /// it joins the group when its worker listens (Node) or just before it starts (another
    /// program), and the steering deals to it once it is ready. A removed slot's sockets stay
    /// until its processes are gone (they may still accept what is queued there), then are
    /// shut down and closed: with net.ipv4.tcp_migrate_req the kernel moves what is still
    /// queued to the other sockets of the group.
    pub fn resize(&mut self, n: usize) -> io::Result<()> {
        let from = self.slot_sockets.len();
        let mut added = Vec::new();
        for _ in from..n {
            let socket = above_ten(bind_only(self.host, self.port, true)?)?;
            let mut extra = Vec::new();
            for (port, _) in &self.extra_ports {
                extra.push(bind_public(self.host, *port, true)?);
            }
            added.push((socket, extra));
        }
        let mut ours = self
            .ours
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (socket, extra) in added {
            ours.extend(socket_inodes(std::iter::once(&socket)));
            self.slot_sockets.push(Some(socket));
            for ((_, group), socket) in self.extra_ports.iter_mut().zip(extra) {
                group.push(Some(socket));
            }
        }
        drop(ours);
        let mut leaving = Vec::new();
        for slot in (n..from).rev() {
            let mut sockets: Vec<OwnedFd> = self.slot_sockets.pop().flatten().into_iter().collect();
            for (_, group) in &mut self.extra_ports {
                sockets.extend(group.pop().flatten());
            }
            leaving.push((slot, sockets));
        }
        if n > 1 && !self.group_tried {
            self.group_tried = true;
            self.steer_group();
        }
        if let Some(steering) = &mut self.steering {
            // Through a socket in the group: one that listens (the removed ones still do).
            let listening = self
                .slot_sockets
                .iter()
                .flatten()
                .chain(leaving.iter().flat_map(|(_, sockets)| sockets.first()))
                .find(|s| accepting(s));
            if let Err(err) = steering.resize(n as u32, listening) {
                tracing::warn!("the steering cannot follow the scale to {n} slots: {err}");
            }
        }
        self.with_slots(|table| {
            for (slot, sockets) in leaving {
                let state = table.slots.pop().unwrap_or_default();
                table.leaving.push(Leaving {
                    slot,
                    pids: state.live,
                    sockets,
                });
            }
            while table.slots.len() < n {
                table.slots.push(SlotState {
                    out: true,
                    ..SlotState::default()
                });
            }
            self.settle(table);
        });
        Ok(())
    }

    /// A pool that started with one slot and grew: round-robin steering and queue migration,
    /// as a pool started with several gets them.
    fn steer_group(&mut self) {
        let (migrate, how) = enable_migration();
        self.migrate = migrate;
        // Slot i's socket is entry i: the listening ones from slot 0 on (the new ones join
        // the map as they listen).
        let listening: Vec<&OwnedFd> = self
            .slot_sockets
            .iter()
            .map_while(|s| s.as_ref().filter(|s| accepting(s)))
            .collect();
        let deal = if self.sticky {
            steer::Deal::Sticky
        } else {
            steer::Deal::Turn
        };
        let spread = match steer::ebpf(&listening, deal, crate::scale::MAX_WORKERS as u32) {
            Ok(steering) => {
                self.with_slots(|table| table.steered = (0..listening.len() as u32).collect());
                self.steering = Some(steering);
                match deal {
                    steer::Deal::Turn => "connections in turn (eBPF)".to_string(),
                    steer::Deal::Sticky => "connections by client address (eBPF)".to_string(),
                }
            }
            Err(err) if self.sticky => match steer::classic(&listening) {
                Ok(steering) => {
                    self.steering = Some(steering);
                    format!("connections by client address (classic BPF; no eBPF: {err})")
                }
                Err(classic) => {
                    tracing::warn!(
                        "--sticky ip: cannot steer by client address (no eBPF: {err}; no classic \
                         BPF: {classic}); connections are spread as without it"
                    );
                    format!("connections by the kernel's hash (no eBPF: {err})")
                }
            },
            Err(err) => format!("connections by the kernel's hash (no eBPF round robin: {err})"),
        };
        self.spread = format!("{spread}; {how}");
        tracing::info!("balance socket: {}", self.spread);
    }

    /// Closes the sockets of removed slots whose processes are all gone. Shut down first, so
    /// that a descendant still holding a copy cannot keep it listening; what is queued moves
    /// to the other sockets when the kernel may migrate it, else it is reset (said once).
    fn close_leaving(&self, table: &mut SlotTable) {
        let (done, kept): (Vec<Leaving>, Vec<Leaving>) = std::mem::take(&mut table.leaving)
            .into_iter()
            .partition(|l| l.pids.is_empty());
        table.leaving = kept;
        for leaving in done {
            let slot = leaving.slot;
            let mut ours = self
                .ours
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for socket in &leaving.sockets {
                if !self.migrate
                    && let Ok(n @ 1..) = queued(socket)
                {
                    tracing::warn!(
                        "worker {slot} removed: {n} connection(s) still queued on its socket are \
                         reset (net.ipv4.tcp_migrate_req is off)"
                    );
                }
                let listened = accepting(socket);
                match socket::shutdown(socket.as_raw_fd(), socket::Shutdown::Read) {
                    Ok(()) if listened => {
                        if let Some(steering) = &self.steering {
                            steering.left(socket);
                        }
                    }
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
        }
    }

    /// The pool is stopping: close the sockets (see `Balancer::close`).
    pub fn close(&mut self) {
        self.slot_sockets.clear();
        if let Some(task) = self.port_watch.take() {
            task.abort();
        }
    }
}

/// Socket mode: the sockets of a slot a scale removed, kept until its processes are gone (they
/// may still accept what is queued there), then closed.
struct Leaving {
    slot: usize,
    pids: HashSet<i32>,
    /// The public port's socket first, then the further ports'.
    sockets: Vec<OwnedFd>,
}

/// Socket mode: a slot's processes (group leaders), the ready ones, and whether corepool took
/// its socket out of the group (and the steering's map) since it was last ready.
#[derive(Default)]
struct SlotState {
    live: HashSet<i32>,
    ready: HashSet<i32>,
    out: bool,
}

/// Whether a socket listens (SO_ACCEPTCONN); false when that cannot be read.
fn accepting(socket: &OwnedFd) -> bool {
    socket::getsockopt(socket, socket::sockopt::AcceptConn).unwrap_or(false)
}

#[derive(Default)]
struct SlotTable {
    slots: Vec<SlotState>,
    /// The ready slots the steering deals to, as last written.
    steered: Vec<u32>,
    /// Removed slots' sockets, until their processes are gone.
    leaving: Vec<Leaving>,
}

/// Connections waiting in a listening socket's accept queue (`tcpi_unacked` of a listener).
fn queued(socket: &OwnedFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket, a pointer to a tcp_info and its size.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_unacked)
}

const MIGRATE_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Lets the kernel move the connections queued on a listener that stops listening to another
/// listener of its reuseport group (net.ipv4.tcp_migrate_req, this network namespace only),
/// instead of resetting them. Whether that is on, and how it came to be, for the log.
///
/// Only PID 1 sets it: then the network namespace is the container's (or the pod's, whose
/// other containers gain from it too). Started by hand on a host, corepool leaves the host's
/// setting alone and says how to turn it on.
fn enable_migration() -> (bool, String) {
    let may_set = std::process::id() == 1;
    match std::fs::read_to_string(MIGRATE_SYSCTL) {
        Ok(text) if text.trim() != "0" => (
            true,
            "a dead worker's queued connections move to another (tcp_migrate_req)".into(),
        ),
        Ok(_) if !may_set => (
            false,
            "net.ipv4.tcp_migrate_req is 0 and corepool is not PID 1, so it leaves this \
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
