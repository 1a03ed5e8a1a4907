//! Balance: how N workers serve one public port (`--balance`), one type per mode.
//!
//! - `socket` (default, `socket.rs`): one SO_REUSEPORT socket per slot, handed to the worker
//!   as fd 3; the kernel (or `steer`'s eBPF) spreads connections; `ports.rs` binds the group
//!   and watches the port for strangers.
//! - `proxy` (`proxied.rs`): each worker listens on a private port of its own; corepool
//!   relays (see `proxy`). The Node preload is loaded here too, for its drain on the stop
//!   signal (no listen redirect).
//! - `none`: no port handling at all (queue consumers), optionally PORT=base+slot.
//!
//! Every mode adds the Node environment (`node`); socket and proxy modes give the workers a
//! NOTIFY_SOCKET (`readiness`). The pool asks `Balancer` and never matches on the mode.

mod ports;
mod proxied;
mod socket;

use crate::launch::WorkerIo;
use crate::metrics::Shared;
use crate::node::NodeEnv;
use crate::proxy;
use crate::readiness::{NotifySocket, Ready, ReadyPipe};
use proxied::ProxyMode;
use socket::SocketMode;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::mpsc;

/// How workers share the public port (declared with the options that choose it).
pub use crate::config::Mode;

/// Each mode with its own state.
enum Balance {
    Socket(SocketMode),
    Proxy(ProxyMode),
    /// `--port-increment`: PORT=base+slot for each worker.
    None {
        port: u16,
        port_increment: bool,
    },
}

/// The port-sharing set-up of the pool, made once at start-up: the mode's state, and what
/// every mode's workers get (the Node environment, NOTIFY_SOCKET).
pub struct Balancer {
    balance: Balance,
    node: NodeEnv,
    /// The sd_notify socket (moves into its task at `start`); none in `none` mode.
    notify: Option<NotifySocket>,
    /// NOTIFY_SOCKET for the workers.
    notify_env: Option<String>,
    ready_tx: mpsc::UnboundedSender<Ready>,
}

/// What a launch needs kept until the worker runs: the readiness pipe, the private port.
pub struct Handover {
    pub io: WorkerIo,
    slot: usize,
    ready_pipe: Option<ReadyPipe>,
    private_port: Option<u16>,
}

impl Balancer {
    pub fn new(
        mode: Mode,
        host: IpAddr,
        port: u16,
        slots: usize,
        port_increment: bool,
        node: NodeEnv,
        ready_tx: mpsc::UnboundedSender<Ready>,
    ) -> Result<Balancer, String> {
        let balance = match mode {
            Mode::Proxy => Balance::Proxy(ProxyMode::bind(host, port)?),
            Mode::Socket => Balance::Socket(SocketMode::bind(host, port, slots)?),
            Mode::None => Balance::None {
                port,
                port_increment,
            },
        };
        let notify = match mode {
            Mode::None => None,
            _ => Some(NotifySocket::bind().map_err(|e| {
                format!("cannot create the sd_notify socket (for NOTIFY_SOCKET): {e}")
            })?),
        };
        Ok(Balancer {
            balance,
            node,
            notify_env: notify.as_ref().map(NotifySocket::env_value),
            notify,
            ready_tx,
        })
    }

    pub fn mode(&self) -> Mode {
        match self.balance {
            Balance::Socket(_) => Mode::Socket,
            Balance::Proxy(_) => Mode::Proxy,
            Balance::None { .. } => Mode::None,
        }
    }

    /// Socket mode: how connections are spread over the slots, for the start-up log (empty
    /// in the other modes, or with one slot).
    pub fn spread(&self) -> &str {
        match &self.balance {
            Balance::Socket(socket) => &socket.spread,
            _ => "",
        }
    }

    /// Proxy mode: the relay's bounds (before `start`).
    pub fn set_proxy_limits(&mut self, limits: proxy::Limits) {
        if let Balance::Proxy(proxied) = &mut self.balance {
            proxied.set_limits(limits);
        }
    }

    /// Proxy mode: a new connection limit while the pool runs (`--max-connections auto`
    /// follows the worker count); other modes have none.
    pub fn set_max_connections(&self, max: usize) {
        if let Balance::Proxy(proxied) = &self.balance {
            proxied.set_max_connections(max);
        }
    }

    /// Socket mode: readiness from process.send('ready') instead of the listen (`--ready-on`).
    pub fn set_ready_on_message(&mut self, on_message: bool) {
        if let Balance::Socket(socket) = &mut self.balance {
            socket.ready_on_message = on_message;
        }
    }

    /// The stop signal, passed on as COREPOOL_STOP_SIGNAL: the preload drains on it.
    pub fn set_stop_signal(&mut self, signal: nix::sys::signal::Signal) {
        self.node.stop_signal = signal;
    }

    /// Adds `--max-old-space-size` to every worker's NODE_OPTIONS.
    pub fn set_heap_option(&mut self, option: Option<String>) {
        self.node.heap_option = option;
    }

    /// `--sticky ip`: a client address reaches the same slot of `workers` while it is ready
    /// (socket mode: by the BPF steering, proxy mode: by the relay's choice).
    pub fn set_sticky(&mut self, workers: usize) {
        match &mut self.balance {
            Balance::Socket(socket) => socket.set_sticky(),
            Balance::Proxy(proxied) => proxied.set_sticky(workers),
            Balance::None { .. } => {}
        }
    }

    /// Socket mode: whether the command is Node (which re-joins a slot's socket to the group
    /// itself when it listens; another program gets it listening before it starts).
    pub fn set_node_workers(&mut self, node: bool) {
        if let Balance::Socket(socket) = &mut self.balance {
            socket.node_workers = node;
        }
    }

    /// Socket mode: binds a group of per-slot sockets on each further port of `--port`.
    pub fn share_ports(&mut self, extra: &[u16]) -> Result<(), String> {
        match &mut self.balance {
            Balance::Socket(socket) => socket.share_ports(extra),
            _ => Ok(()),
        }
    }

    /// Whether a worker must report readiness (else it is ready once started).
    pub fn needs_ready(&self) -> bool {
        !matches!(self.balance, Balance::None { .. })
    }

    /// The variables and descriptors for the worker of `slot`.
    pub fn handover(&self, slot: usize, workers: usize) -> io::Result<Handover> {
        let mut io = WorkerIo::default();
        io.env.push(("COREPOOL_WORKER".into(), slot.to_string()));
        io.env.push(("NODE_APP_INSTANCE".into(), slot.to_string()));
        io.env
            .push(("COREPOOL_WORKERS".into(), workers.to_string()));
        let mut ready_pipe = None;
        let mut private_port = None;
        match &self.balance {
            Balance::None {
                port,
                port_increment,
            } => {
                if *port_increment {
                    let port = u32::from(*port) + slot as u32;
                    io.env.push(("PORT".into(), port.to_string()));
                }
                io.unset.extend([
                    "LISTEN_FDS",
                    "LISTEN_PID",
                    "LISTEN_FDNAMES",
                    "NOTIFY_SOCKET",
                ]);
            }
            Balance::Proxy(proxied) => private_port = Some(proxied.handover(&mut io)?),
            Balance::Socket(socket) => socket.handover(slot, &mut io, &mut ready_pipe)?,
        }
        if let Some(notify) = &self.notify_env {
            io.env.push(("NOTIFY_SOCKET".into(), notify.clone()));
        }
        self.node.apply(&mut io);
        Ok(Handover {
            io,
            slot,
            ready_pipe,
            private_port,
        })
    }

    /// After a successful launch: the worker's routing, and the watch of its readiness pipe.
    pub fn watch(&self, handover: Handover, pid: i32) {
        match &self.balance {
            Balance::Proxy(proxied) => {
                if let Some(port) = handover.private_port {
                    proxied.started(handover.slot, pid, port, self.ready_tx.clone());
                }
            }
            Balance::Socket(socket) => socket.started(handover.slot, pid),
            Balance::None { .. } => {}
        }
        if let Some(pipe) = handover.ready_pipe {
            pipe.watch(pid, self.ready_tx.clone());
        }
    }

    /// Starts the sd_notify listener and, in proxy mode, the accept loop (once, in the runtime).
    pub fn start(&mut self) {
        if let Some(notify) = self.notify.take() {
            tokio::spawn(notify.serve(self.ready_tx.clone()));
        }
        if let Balance::Proxy(proxied) = &mut self.balance {
            proxied.start();
        }
    }

    /// Socket and proxy mode: watches the public port for listeners that are not the pool's,
    /// and reports them through /readyz (once, in the runtime).
    pub fn watch_port(&mut self, shared: Arc<Shared>) {
        match &mut self.balance {
            Balance::Socket(socket) => socket.watch_port(shared),
            Balance::Proxy(proxied) => proxied.watch_port(shared),
            Balance::None { .. } => {}
        }
    }

    /// Proxy connections (open now, accepted in all, requests resent to another worker), for
    /// metrics; None in the other modes.
    pub fn connections(&self) -> (Option<usize>, Option<u64>, Option<u64>) {
        match &self.balance {
            Balance::Proxy(proxied) => {
                let (open, accepted, resent) = proxied.connections();
                (Some(open), Some(accepted), Some(resent))
            }
            _ => (None, None, None),
        }
    }

    /// Proxy mode: the connection limit and the times the accept loop stopped at it, for
    /// metrics; None in the other modes.
    pub fn connection_limit(&self) -> Option<(usize, u64)> {
        match &self.balance {
            Balance::Proxy(proxied) => Some(proxied.connection_limit()),
            _ => None,
        }
    }

    /// A slot given up for good: close its sockets (socket mode).
    pub fn abandon(&mut self, slot: usize) {
        if let Balance::Socket(socket) = &mut self.balance {
            socket.abandon(slot);
        }
    }

    /// Readiness news for the routing: the proxy's, or the slot's place in the group.
    pub fn worker_ready(&self, pid: i32) {
        match &self.balance {
            Balance::Proxy(proxied) => proxied.worker_ready(pid),
            Balance::Socket(socket) => socket.worker_ready(pid),
            Balance::None { .. } => {}
        }
    }

    /// The worker is stopping or gone: route nothing new to it.
    pub fn forget(&self, pid: i32) {
        match &self.balance {
            Balance::Proxy(proxied) => proxied.forget(pid),
            Balance::Socket(socket) => socket.forget(pid),
            Balance::None { .. } => {}
        }
    }

    /// The pool now has `slots` slots (a scale): socket mode adds and removes slot sockets
    /// (see `SocketMode::resize`); proxy mode's `--sticky ip` hashes over the new count.
    pub fn resize(&mut self, slots: usize) -> io::Result<()> {
        match &mut self.balance {
            Balance::Socket(socket) => socket.resize(slots),
            Balance::Proxy(proxied) => {
                proxied.resize(slots);
                Ok(())
            }
            Balance::None {
                port,
                port_increment: true,
            } if usize::from(*port) + slots > usize::from(u16::MAX) + 1 => Err(io::Error::other(
                format!("{slots} workers from port {port} would go past 65535 (--port-increment)"),
            )),
            _ => Ok(()),
        }
    }

    /// A worker process (its group's leader) exited: it no longer holds its slot's socket.
    pub fn exited(&self, pid: i32) {
        if let Balance::Socket(socket) = &self.balance {
            socket.exited(pid);
        }
        self.forget(pid);
    }

    /// The pool is stopping: close the public socket, so that once the workers have closed
    /// theirs new connections are refused at once (and a client retries elsewhere) instead of
    /// waiting in a backlog nobody will accept from.
    pub fn close(&mut self) {
        match &mut self.balance {
            Balance::Proxy(proxied) => proxied.close(),
            Balance::Socket(socket) => socket.close(),
            Balance::None { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("Socket"), Ok(Mode::Socket));
        assert!(Mode::parse("magic").is_err());
    }
}
