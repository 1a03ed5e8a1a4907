//! Proxy mode's state: the public sockets corepool accepts on, the workers' private ports (the
//! backends) and the accept loops. The relaying itself is `proxy` and `relay`.
//!
//! With one relay thread the public port is one plain socket. With several, each relay thread
//! accepts on a socket of its own in an SO_REUSEPORT group, so that the kernel spreads new
//! connections over the threads (one shared socket woke every thread for each connection and
//! left most of them to whichever thread woke first). The group is bound as socket mode's is:
//! refused when anything already listens on the port, and watched for strangers joining it.

use super::ports::{OurSockets, bind_group, bind_public, socket_inodes, watch_port};
use crate::launch::WorkerIo;
use crate::metrics::Shared;
use crate::proxy::{self, Backends};
use crate::readiness::Ready;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::sync::mpsc;

pub struct ProxyMode {
    host: IpAddr,
    port: u16,
    /// The public sockets we accept on, one per relay thread (moved into the accept loops at
    /// `start`).
    listeners: Vec<OwnedFd>,
    /// Their inodes, for the port watch (empty with one plain socket: nobody can join it).
    ours: OurSockets,
    port_watch: Option<tokio::task::JoinHandle<()>>,
    /// The workers' private ports.
    backends: Backends,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    /// `--max-connections` (as set at start) and `--idle-timeout`.
    limits: proxy::Limits,
    /// The connection limit now (`--max-connections auto` follows the worker count).
    capacity: Arc<proxy::Capacity>,
}

impl ProxyMode {
    /// Binds the public port: one socket per relay thread (see the module's comment).
    pub fn bind(host: IpAddr, port: u16) -> Result<ProxyMode, String> {
        let addr = SocketAddr::new(host, port);
        let (listeners, ours) = match proxy::relay_threads() {
            1 => {
                let listener = bind_public(host, port, false)
                    .map_err(|e| format!("cannot listen on {addr} (--host/--port): {e}"))?;
                (vec![listener], Default::default())
            }
            threads => {
                let group: Vec<OwnedFd> = bind_group(host, port, threads)?
                    .into_iter()
                    .flatten()
                    .collect();
                let ours = socket_inodes(group.iter());
                (group, ours)
            }
        };
        Ok(ProxyMode {
            host,
            port,
            listeners,
            ours: Arc::new(std::sync::Mutex::new(ours)),
            port_watch: None,
            backends: Backends::default(),
            accept_task: None,
            limits: proxy::Limits::default(),
            capacity: proxy::Capacity::new(proxy::Limits::default().max_connections),
        })
    }

    /// `--max-connections` and `--idle-timeout` (before `start`).
    pub fn set_limits(&mut self, limits: proxy::Limits) {
        self.limits = limits;
        self.capacity = proxy::Capacity::new(limits.max_connections);
    }

    /// A new connection limit while the pool runs (`--max-connections auto` after a scale).
    pub fn set_max_connections(&self, max: usize) {
        self.capacity.set(max);
    }

    /// A private port for the next worker, in `PORT` (HOSTNAME=127.0.0.1); returns the port.
    pub fn handover(&self, io: &mut WorkerIo) -> io::Result<u16> {
        let port = proxy::private_port(&self.backends.ports())?;
        io.env.push(("PORT".into(), port.to_string()));
        io.env.push(("HOSTNAME".into(), "127.0.0.1".into()));
        io.unset
            .extend(["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]);
        Ok(port)
    }

    /// A worker started on its private port: a backend, ready once the port accepts.
    pub fn started(
        &self,
        slot: usize,
        pid: i32,
        port: u16,
        ready_tx: mpsc::UnboundedSender<Ready>,
    ) {
        self.backends.add(pid, port, slot);
        proxy::probe(self.backends.clone(), pid, port, ready_tx);
    }

    /// `--sticky ip` over `workers` slots (before `start`).
    pub fn set_sticky(&mut self, workers: usize) {
        self.backends.set_sticky(workers);
    }

    /// The pool now has `workers` slots (a scale).
    pub fn resize(&self, workers: usize) {
        self.backends.resize(workers);
    }

    /// Starts the accept loops (once, in the runtime).
    pub fn start(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        let listeners = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect();
        self.accept_task = Some(tokio::spawn(proxy::serve(
            listeners,
            self.backends.clone(),
            self.limits,
            self.capacity.clone(),
        )));
    }

    /// Watches the public port for listeners that joined the group and are not the pool's,
    /// and reports them through /readyz (once, in the runtime; nothing to watch with one plain
    /// socket).
    pub fn watch_port(&mut self, shared: Arc<Shared>) {
        let grouped = !self
            .ours
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if grouped && self.port_watch.is_none() {
            let ours = self.ours.clone();
            self.port_watch = Some(tokio::spawn(watch_port(self.host, self.port, ours, shared)));
        }
    }

    /// Connections open now, accepted in all, and requests resent to another worker, for
    /// metrics.
    pub fn connections(&self) -> (usize, u64, u64) {
        (
            self.backends.open_connections(),
            self.backends.accepted(),
            self.backends.resent(),
        )
    }

    /// The connection limit and the times the accept loop stopped at it, for metrics.
    pub fn connection_limit(&self) -> (usize, u64) {
        (self.capacity.max(), self.backends.limit_reached())
    }

    pub fn worker_ready(&self, pid: i32) {
        self.backends.ready(pid);
    }

    pub fn forget(&self, pid: i32) {
        self.backends.remove(pid);
    }

    /// The pool is stopping: close the public sockets and stop accepting.
    pub fn close(&mut self) {
        self.listeners.clear();
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        if let Some(watch) = self.port_watch.take() {
            watch.abort();
        }
    }
}
