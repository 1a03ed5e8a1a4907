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
//!   of the group by the kernel (Linux 5.14): as the eBPF program chooses (it is loaded to
//!   migrate too), or by the hash when `net.ipv4.tcp_migrate_req` is 1 (per network
//!   namespace; corepool sets it at start when it is the container's program and may, and says
//!   so). Where neither is possible, corepool accepts what is queued itself before the
//!   shutdown and relays it to the group (`rescue`), rather than leave it for the slot's next
//!   process or have it reset.
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
//!
//! Layout: [`SocketMode`] here (binding, the worker lifecycle calls, scale); `slots` its record
//! of the slots and removed sockets; `steering` the glue to `steer`; `handover` the fds and
//! variables a worker gets; `rescue` the relay of a dead worker's queue where the kernel
//! cannot move it.

use super::ports::{OurSockets, bind_group, bind_only, bind_public, socket_inodes, watch_port};
use crate::launch::WorkerIo;
use crate::launch::above_ten;
use crate::metrics::Shared;
use crate::readiness::ReadyPipe;
use nix::sys::socket;
use slots::{Leaving, SlotState, SlotTable, accepting, enable_migration, queued};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use steering::GroupSteering;

mod handover;
mod rescue;
mod slots;
mod steering;

/// Socket mode's state: the slots' sockets and what corepool knows of them.
pub struct SocketMode {
    host: IpAddr,
    port: u16,
    /// One SO_REUSEPORT listening socket per slot, handed to that slot's worker.
    slot_sockets: Vec<Option<OwnedFd>>,
    /// The steering of the group (round robin or `--sticky ip`), when the kernel allows it.
    steering: GroupSteering,
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
}

/// Whether a dead worker's queued connections move to another slot when its socket leaves the
/// group, and how, for the log: by the eBPF steering program where it was loaded to migrate
/// too (the namespace's setting untouched), else by `net.ipv4.tcp_migrate_req`.
fn migration(steering: &GroupSteering) -> (bool, String) {
    match steering.migrates() {
        true => (
            true,
            "a dead worker's queued connections move to a ready one (the eBPF program \
             migrates them)"
                .into(),
        ),
        false => enable_migration(),
    }
}

impl SocketMode {
    /// Binds the group on the first port (refused when another process listens there), and
    /// sets up the steering and the migration of queued connections.
    pub fn bind(host: IpAddr, port: u16, slots: usize) -> Result<SocketMode, String> {
        let slot_sockets = bind_group(host, port, slots)?;
        let (steering, mut spread) = match slot_sockets.len() {
            0 | 1 => (GroupSteering::default(), String::new()),
            _ => {
                let group: Vec<&OwnedFd> = slot_sockets.iter().flatten().collect();
                GroupSteering::round_robin(&group)
            }
        };
        let migrate = slot_sockets.len() > 1 && {
            let (migrate, how) = migration(&steering);
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
            handover::hand_over(
                listener,
                slot,
                &self.extra_ports,
                self.port,
                self.ready_on_message,
                io,
                ready_pipe,
            )?;
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
        self.steering.rejoin(slot, socket);
    }

    /// Takes the sockets of slots without a live process out of the group while another
    /// slot is ready, and tells the steering which slots are ready.
    fn settle(&self, table: &mut SlotTable) {
        table.close_leaving(&self.ours, self.migrate, &self.steering);
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
            // Without migration the shutdown would reset what is queued: corepool accepts it
            // first and relays it to the group (see `rescue`).
            let mut rescued = Vec::new();
            if !self.migrate {
                match queued(socket) {
                    Ok(0) => {}
                    Ok(_) => {
                        rescued = rescue::take_before_shutdown(
                            socket,
                            rescue::room(n),
                            &format!("worker {s}"),
                        );
                    }
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
                    self.steering.left(socket);
                }
                Err(err) => tracing::warn!("worker {s}: cannot take its socket out: {err}"),
            }
            rescue::relay_taken(rescued, &format!("worker {s}"));
        }
        let ready: Vec<u32> = (0..n)
            .filter(|&s| serving(table, s))
            .map(|s| s as u32)
            .collect();
        self.steering.deal(
            ready,
            &mut table.steered,
            &self.slot_sockets,
            &table.leaving,
        );
    }

    /// `--sticky ip`: the steering deals by a hash of the source address instead of in turn
    /// (the eBPF program replaced in place), or, where eBPF may not be loaded, a classic BPF
    /// program does (see `steer::Classic`).
    pub fn set_sticky(&mut self) {
        self.steering.sticky = true;
        if self.slot_sockets.len() < 2 {
            // A pool of one: set up at its first scale up (`steer_group`).
            return;
        }
        let group: Vec<&OwnedFd> = self.slot_sockets.iter().flatten().collect();
        let Some(spread) = self.steering.set_sticky(&group) else {
            return;
        };
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
        // Through a socket in the group: one that listens (the removed ones still do).
        let listening = self
            .slot_sockets
            .iter()
            .flatten()
            .chain(leaving.iter().flat_map(|(_, sockets)| sockets.first()))
            .find(|s| accepting(s));
        self.steering.resize(n, listening);
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
        // Slot i's socket is entry i: the listening ones from slot 0 on (the new ones join
        // the map as they listen).
        let listening: Vec<&OwnedFd> = self
            .slot_sockets
            .iter()
            .map_while(|s| s.as_ref().filter(|s| accepting(s)))
            .collect();
        let (spread, steered) = self.steering.setup(&listening);
        if steered {
            self.with_slots(|table| table.steered = (0..listening.len() as u32).collect());
        }
        let (migrate, how) = migration(&self.steering);
        self.migrate = migrate;
        self.spread = format!("{spread}; {how}");
        tracing::info!("balance socket: {}", self.spread);
    }

    /// The pool is stopping: close the sockets (see `Balancer::close`).
    pub fn close(&mut self) {
        self.slot_sockets.clear();
        if let Some(task) = self.port_watch.take() {
            task.abort();
        }
    }
}
