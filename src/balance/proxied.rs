//! Proxy mode's state: the public socket corepool accepts on, the workers' private ports (the
//! backends) and the accept loop. The relaying itself is `proxy` and `relay`.

use super::ports::bind_public;
use crate::launch::WorkerIo;
use crate::proxy::{self, Backends};
use crate::readiness::Ready;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use tokio::sync::mpsc;

pub struct ProxyMode {
    /// The public socket we accept on (moved into the accept loop at `start`).
    listener: Option<OwnedFd>,
    /// The workers' private ports.
    backends: Backends,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    /// `--max-connections` and `--idle-timeout`.
    pub limits: proxy::Limits,
}

impl ProxyMode {
    /// Binds the public port (no SO_REUSEPORT: corepool alone accepts on it).
    pub fn bind(host: IpAddr, port: u16) -> Result<ProxyMode, String> {
        let addr = SocketAddr::new(host, port);
        let listener = bind_public(host, port, false)
            .map_err(|e| format!("cannot listen on {addr} (--host/--port): {e}"))?;
        Ok(ProxyMode {
            listener: Some(listener),
            backends: Backends::default(),
            accept_task: None,
            limits: proxy::Limits::default(),
        })
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

    /// Starts the accept loop (once, in the runtime).
    pub fn start(&mut self) {
        if let Some(listener) = self.listener.take() {
            let listener = std::net::TcpListener::from(listener);
            self.accept_task = Some(tokio::spawn(proxy::serve(
                listener,
                self.backends.clone(),
                self.limits,
            )));
        }
    }

    /// Connections open now and accepted in all, for metrics.
    pub fn connections(&self) -> (usize, u64) {
        (self.backends.open_connections(), self.backends.accepted())
    }

    /// The connection limit and the times the accept loop stopped at it, for metrics.
    pub fn connection_limit(&self) -> (usize, u64) {
        (self.limits.max_connections, self.backends.limit_reached())
    }

    pub fn worker_ready(&self, pid: i32) {
        self.backends.ready(pid);
    }

    pub fn forget(&self, pid: i32) {
        self.backends.remove(pid);
    }

    /// The pool is stopping: close the public socket and stop accepting.
    pub fn close(&mut self) {
        self.listener = None;
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}
