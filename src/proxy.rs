//! Proxy: the public port for servers that only know `$PORT` (`--balance proxy`).
//!
//! Each worker process gets a private loopback port of its own (`PORT`, `HOSTNAME=127.0.0.1`).
//! corepool accepts on the public port and relays each connection to a ready worker, the one
//! with the fewest open connections first; when a worker refuses the connect (it is restarting
//! or shutting down), the next one is tried, so a client sees no refusal while any worker is
//! up. A worker is ready once its private port accepts a connection (probed every 50 ms).
//!
//! The bytes of each connection are moved by `relay` (splice(2), half-closes kept, nothing
//! interpreted, so WebSocket upgrades and large bodies pass as they are).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::balance::Ready;
use crate::relay;

/// How often a starting worker's private port is probed.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// One worker process as the proxy sees it.
#[derive(Debug)]
struct Backend {
    pid: i32,
    port: u16,
    ready: bool,
    active: Arc<AtomicUsize>,
}

/// The workers' private ports, shared by the pool (which adds, readies and removes them) and
/// the accept loop (which picks one per connection).
#[derive(Clone, Default)]
pub struct Backends(Arc<Mutex<Vec<Backend>>>, Arc<std::sync::atomic::AtomicU64>);
// .0: the backends; .1: connections accepted (also the round-robin turn among equals).

impl Backends {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<Backend>) -> R) -> R {
        // A poisoned lock means a panic elsewhere; the data (a list) is still consistent.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A new worker process on `port`, not ready yet.
    pub fn add(&self, pid: i32, port: u16) {
        self.with(|list| {
            list.push(Backend {
                pid,
                port,
                ready: false,
                active: Arc::new(AtomicUsize::new(0)),
            })
        });
    }

    /// The worker accepts connections: route to it.
    pub fn ready(&self, pid: i32) {
        self.with(|list| {
            list.iter_mut()
                .filter(|b| b.pid == pid)
                .for_each(|b| b.ready = true)
        });
    }

    /// The worker is stopping or gone: route nothing new to it.
    pub fn remove(&self, pid: i32) {
        self.with(|list| list.retain(|b| b.pid != pid));
    }

    /// Ready backends, fewest open connections first; among equals, in turn (so that one
    /// client making requests one after another is spread too).
    fn candidates(&self) -> Vec<(u16, Arc<AtomicUsize>)> {
        let turn = self.1.load(Ordering::Relaxed) as usize;
        self.with(|list| {
            let mut ready: Vec<_> = list
                .iter()
                .filter(|b| b.ready)
                .map(|b| (b.port, b.active.clone()))
                .collect();
            let n = ready.len().max(1);
            ready.rotate_left(turn % n);
            // A stable sort keeps the rotation among backends equally busy.
            ready.sort_by_key(|(_, active)| active.load(Ordering::Relaxed));
            ready
        })
    }

    /// Connections accepted since start, for metrics.
    pub fn accepted(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }

    /// Connections being relayed now, for metrics and logs.
    pub fn open_connections(&self) -> usize {
        self.with(|list| list.iter().map(|b| b.active.load(Ordering::Relaxed)).sum())
    }
}

/// A free loopback port for a new worker process. The port is only reserved until we close
/// our socket, so a race with another program is possible but shows as a worker that fails to
/// listen and is restarted with a new port.
pub fn private_port() -> std::io::Result<u16> {
    let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(probe.local_addr()?.port())
}

/// Probes `port` until it accepts, then reports `pid` ready. Gives up when the worker leaves
/// the backend list (it exited, or was stopped).
pub fn probe(backends: Backends, pid: i32, port: u16, tx: mpsc::UnboundedSender<Ready>) {
    tokio::spawn(async move {
        loop {
            let known = backends.with(|list| list.iter().any(|b| b.pid == pid));
            if !known {
                return;
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_ok()
            {
                backends.ready(pid);
                let _ = tx.send(Ready { pid });
                return;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    });
}

/// Accepts on the public listener until the pool stops, relaying every connection.
pub async fn serve(listener: std::net::TcpListener, backends: Backends) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!("proxy: cannot use the public socket: {err}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                backends.1.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay(client, peer, backends.clone()));
            }
            Err(err) => {
                // EMFILE and friends: say so, breathe, go on.
                tracing::warn!("proxy: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connects to the least busy ready worker (trying the others on refusal) and relays.
async fn relay(client: TcpStream, peer: SocketAddr, backends: Backends) {
    let _ = client.set_nodelay(true);
    // While no worker is ready (all restarting), wait a little rather than refuse.
    for _attempt in 0..100 {
        for (port, active) in backends.candidates() {
            let Ok(upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
                continue;
            };
            let _ = upstream.set_nodelay(true);
            active.fetch_add(1, Ordering::Relaxed);
            let result = relay::relay(&client, &upstream).await;
            active.fetch_sub(1, Ordering::Relaxed);
            if let Err(err) = result {
                tracing::debug!("proxy: connection from {peer} ended: {err}");
            }
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    tracing::warn!("proxy: no worker ready for {peer} after 5s; connection closed");
}
