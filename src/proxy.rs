//! Proxy: the public port for servers that only know `$PORT` (`--balance proxy`).
//!
//! Each worker process gets a private loopback port of its own (`PORT`, `HOSTNAME=127.0.0.1`),
//! drawn below the ephemeral port range (see `private_port`).
//! corepool accepts on the public port and relays each connection to a ready worker, the one
//! with the fewest open connections first; when a worker refuses the connect (it is restarting
//! or shutting down), the next one is tried, so a client sees no refusal while any worker is
//! up; when a worker dies without reading what the client sent, that goes to another (see
//! [`relay`]). A worker is ready once its private port accepts a connection (probed every 5 ms
//! for its first 2 s, then every 50 ms).
//!
//! The bytes of each connection are moved by `relay` (splice(2), half-closes kept, nothing
//! interpreted, so WebSocket upgrades and large bodies pass as they are), on relay threads of
//! their own, one per CPU, beside the supervisor's (see `serve`).
//!
//! At most `--max-connections` are relayed at once. At the limit the accept loop stops
//! accepting, as HAProxy does at `maxconn`: new clients wait in the kernel's listen backlog
//! (1024) and are taken in turn as relays end, rather than being accepted only to be closed.
//! The limit keeps corepool's descriptors for itself (a relay costs six, see `limits`): with
//! none left it could not answer `/healthz`, start a worker or accept a probe. A relay on which
//! no byte moved for `--idle-timeout` is closed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::readiness::Ready;
use crate::relay;

/// How often a starting worker's private port is probed: often while a server of the usual
/// kind would be starting (Node's hello listens ~90 ms after exec), then less.
const PROBE_EVERY: Duration = Duration::from_millis(50);
const PROBE_EARLY_EVERY: Duration = Duration::from_millis(5);
const PROBE_EARLY_FOR: Duration = Duration::from_secs(2);

/// How long a connection waits for a ready worker when none is (all starting or restarting)
/// before it is closed.
const WAIT_FOR_READY: Duration = Duration::from_secs(5);

/// Reaching `--max-connections` is logged at most this often.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds of the relay: `--max-connections` and `--idle-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: crate::limits::auto_max_connections(1024, 1),
            idle_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// The relays a pool may run at once (`--max-connections`), changed while the accept loops
/// run when `auto` follows the worker count (more workers, a bigger descriptor reserve for
/// corepool, fewer relays). A raised limit takes effect at once; a lowered one as relays end
/// (open connections are never cut for it).
#[derive(Debug)]
pub struct Capacity {
    slots: Arc<Semaphore>,
    max: AtomicUsize,
}

impl Capacity {
    pub fn new(max: usize) -> Arc<Capacity> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Capacity {
            slots: Arc::new(Semaphore::new(max)),
            max: AtomicUsize::new(max),
        })
    }

    /// The limit now.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the limit to `max` (in the runtime: a lowered one may need a task that takes
    /// the permits back as the relays holding them end).
    pub fn set(&self, max: usize) {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        let was = self.max.swap(max, Ordering::Relaxed);
        if max > was {
            self.slots.add_permits(max - was);
            return;
        }
        let fewer = was - max;
        let owed = fewer - self.slots.forget_permits(fewer);
        if owed > 0 {
            let slots = self.slots.clone();
            tokio::spawn(async move {
                // The semaphore serves its waiters in order: permits released after an accept
                // loop's wait is served come here until the debt is paid.
                if let Ok(permits) = slots
                    .acquire_many_owned(u32::try_from(owed).unwrap_or(u32::MAX))
                    .await
                {
                    permits.forget();
                }
            });
        }
    }
}

/// One more of something while it lives (a connection open, a connection on a backend).
struct Held(Arc<AtomicUsize>);

impl Held {
    fn new(count: &Arc<AtomicUsize>) -> Held {
        count.fetch_add(1, Ordering::Relaxed);
        Held(count.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker process as the proxy sees it.
#[derive(Debug)]
struct Backend {
    pid: i32,
    /// Its slot (`--sticky ip` picks by slot).
    slot: usize,
    port: u16,
    ready: bool,
    active: Arc<AtomicUsize>,
}

/// A ready worker a connection may go to.
struct Candidate {
    pid: i32,
    port: u16,
    /// Its open connections.
    active: Arc<AtomicUsize>,
}

impl From<&Backend> for Candidate {
    fn from(b: &Backend) -> Candidate {
        Candidate {
            pid: b.pid,
            port: b.port,
            active: b.active.clone(),
        }
    }
}

/// The workers' private ports, shared by the pool (which adds, readies and removes them) and
/// the accept loop (which picks one per connection), and the proxy's counters. One shared
/// allocation: each relay holds a copy, and copying it is one reference count.
#[derive(Clone, Default)]
pub struct Backends(Arc<BackendsState>);

#[derive(Default)]
pub struct BackendsState {
    list: Mutex<Vec<Backend>>,
    /// Connections accepted (also the round-robin turn among equals).
    accepted: AtomicU64,
    /// Connections accepted and not yet closed, whichever backend they went to (or none yet).
    open: Arc<AtomicUsize>,
    /// Times the accept loop stopped at `--max-connections`.
    limit_reached: AtomicU64,
    /// Requests sent again to another worker, theirs gone without reading them.
    resent: AtomicU64,
    /// `--sticky ip`: the pool's slot count (clients are picked a slot by address); 0: off.
    /// Shared with the accept loop, as a scale changes it.
    sticky: AtomicUsize,
    /// Told whenever a worker becomes ready: connections waiting for one go on at once.
    readied: tokio::sync::Notify,
}

impl std::ops::Deref for Backends {
    type Target = BackendsState;

    fn deref(&self) -> &BackendsState {
        &self.0
    }
}

impl Backends {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<Backend>) -> R) -> R {
        // A poisoned lock means a panic elsewhere; the data (a list) is still consistent.
        let mut guard = self.list.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A new worker process of `slot` on `port`, not ready yet.
    pub fn add(&self, pid: i32, port: u16, slot: usize) {
        self.with(|list| {
            list.push(Backend {
                pid,
                slot,
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
        self.readied.notify_waiters();
    }

    /// The private ports given to the workers known now.
    pub fn ports(&self) -> Vec<u16> {
        self.with(|list| list.iter().map(|b| b.port).collect())
    }

    /// The worker is stopping or gone: route nothing new to it.
    pub fn remove(&self, pid: i32) {
        self.with(|list| list.retain(|b| b.pid != pid));
    }

    /// Ready backends, fewest open connections first; among equals, in turn (so that one
    /// client making requests one after another is spread too). `turn` is the connection's
    /// number, taken when it was accepted: a burst of connections accepted before any relay
    /// task ran still gets one turn each.
    fn candidates(&self, turn: u64) -> Vec<Candidate> {
        let turn = turn as usize;
        self.with(|list| {
            let mut ready: Vec<Candidate> = list
                .iter()
                .filter(|b| b.ready)
                .map(Candidate::from)
                .collect();
            let n = ready.len().max(1);
            ready.rotate_left(turn % n);
            // A stable sort keeps the rotation among backends equally busy.
            ready.sort_by_key(|c| c.active.load(Ordering::Relaxed));
            ready
        })
    }

    /// `--sticky ip` over `slots` slots (set before the accept loop starts).
    pub fn set_sticky(&mut self, slots: usize) {
        self.sticky.store(slots.max(1), Ordering::Relaxed);
    }

    /// The pool now has `slots` slots (a scale): `--sticky ip` hashes over that many.
    pub fn resize(&self, slots: usize) {
        let _ = self
            .sticky
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |was| {
                (was > 0).then_some(slots.max(1))
            });
    }

    /// `--sticky ip`: the ready backends for a client at `ip`, the one it sticks to first: a
    /// ready worker of the address's own slot (`hash % slots`, the oldest if a reload briefly
    /// has two), else one of the ready ones chosen by the rest of the hash; then the others
    /// in slot order, should that one refuse. The same choice as socket mode's (`steer`).
    fn sticky_candidates(&self, ip: IpAddr, slots: usize) -> Vec<Candidate> {
        let hash = address_hash(ip) as usize;
        self.with(|list| {
            let mut ready: Vec<&Backend> = list.iter().filter(|b| b.ready).collect();
            // Stable: among a slot's workers, the oldest first.
            ready.sort_by_key(|b| b.slot);
            let own = hash % slots;
            let first = match ready.iter().position(|b| b.slot == own) {
                Some(i) => Some(i),
                None => {
                    let mut slots_ready: Vec<usize> = ready.iter().map(|b| b.slot).collect();
                    slots_ready.dedup();
                    (!slots_ready.is_empty()).then(|| {
                        let slot = slots_ready[hash / slots % slots_ready.len()];
                        ready.iter().position(|b| b.slot == slot).unwrap_or(0)
                    })
                }
            };
            if let Some(i) = first {
                let chosen = ready.remove(i);
                ready.insert(0, chosen);
            }
            ready.into_iter().map(Candidate::from).collect()
        })
    }

    /// Connections accepted since start, for metrics.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now (being relayed, or waiting for a ready worker), for metrics. Counted
    /// apart from the backends, so that relays to a worker already gone still count until
    /// they are released.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Times the accept loop stopped at `--max-connections`, for metrics.
    pub fn limit_reached(&self) -> u64 {
        self.limit_reached.load(Ordering::Relaxed)
    }

    /// Requests sent again to another worker because theirs died without reading them, for
    /// metrics.
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }
}

/// `--sticky ip`: a 16-bit hash of a client address (IPv4-mapped IPv6 as IPv4), the one
/// socket mode's BPF programs compute (`steer`): the golden-ratio multiplicative hash of the
/// address's 32-bit words folded by multiply and xor, its upper half.
pub fn address_hash(ip: IpAddr) -> u32 {
    const MUL: u32 = 0x9E37_79B1;
    let words: Vec<u32> = match ip.to_canonical() {
        IpAddr::V4(v4) => vec![u32::from(v4)],
        IpAddr::V6(v6) => v6
            .octets()
            .chunks(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let mut h = words[0];
    for &w in &words[1..] {
        h = h.wrapping_mul(MUL) ^ w;
    }
    h.wrapping_mul(MUL) >> 16
}

/// A free port for a new worker process, chosen where the kernel never picks ports for
/// outgoing connections: below the start of `net.ipv4.ip_local_port_range` (from 20000 up
/// when the range leaves room, else from 1024), never one another worker was given and is
/// still known by (`taken`), and free now on every address. A port taken from the ephemeral
/// range (bind port 0, close, pass the number on) could be taken in between by an outgoing
/// loopback connection, the relay's own among them, and the worker would fail to listen.
pub fn private_port(taken: &[u16]) -> std::io::Result<u16> {
    let start = ephemeral_start().unwrap_or(32768);
    let low = if start >= 21024 { 20000 } else { 1024 };
    let span = start.saturating_sub(low);
    if span < 64 {
        return Err(std::io::Error::other(format!(
            "no room for private ports below net.ipv4.ip_local_port_range (it starts at {start})"
        )));
    }
    let mut seed = [0u8; 4];
    let mut tries = 0;
    while tries < 256 {
        tries += 1;
        // SAFETY: getrandom writes at most seed.len() bytes into seed.
        let got = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let value = if got == seed.len() as isize {
            u32::from_ne_bytes(seed)
        } else {
            (std::process::id() ^ tries).wrapping_mul(2654435761)
        };
        let port = low + (value % u32::from(span)) as u16;
        if !taken.contains(&port) && free_everywhere(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!(
        "no free port found in {low}-{} (below net.ipv4.ip_local_port_range)",
        start - 1
    )))
}

/// The first port of `net.ipv4.ip_local_port_range`.
fn ephemeral_start() -> Option<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Whether nothing listens on `port` on any address (`::` covers IPv4 too; 0.0.0.0 where
/// there is no IPv6).
fn free_everywhere(port: u16) -> bool {
    use std::net::{Ipv6Addr, TcpListener};
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => false,
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok(),
    }
}

/// Probes `port` until it accepts, then reports `pid` ready. Gives up when the worker leaves
/// the backend list (it exited, or was stopped).
pub fn probe(backends: Backends, pid: i32, port: u16, tx: mpsc::UnboundedSender<Ready>) {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            let known = backends.with(|list| list.iter().any(|b| b.pid == pid));
            if !known {
                return;
            }
            if connect_worker(port).await.is_ok() {
                backends.ready(pid);
                let _ = tx.send(Ready { pid });
                return;
            }
            let every = match started.elapsed() < PROBE_EARLY_FOR {
                true => PROBE_EARLY_EVERY,
                false => PROBE_EVERY,
            };
            tokio::time::sleep(every).await;
        }
    });
}

/// One relay thread per CPU corepool may use, up to this many.
const RELAY_THREADS_MAX: usize = 16;

/// How many relay threads `serve` runs: one per CPU corepool may use (the affinity mask and
/// the cgroup quota, as the standard library counts them), at most `RELAY_THREADS_MAX`.
pub fn relay_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(RELAY_THREADS_MAX)
}

/// Accepts on the public sockets until the pool stops, relaying every connection, at most
/// `capacity` at once.
///
/// The relays run on threads of their own, one per socket of `listeners` (see
/// `relay_threads`), each a single-threaded runtime accepting on its own socket: a relay's
/// cost is mostly the kernel's TCP work done in the relaying thread, so one thread capped the
/// proxy at one CPU, and the supervisor loop does not share its thread with the bytes. The
/// limit (`capacity`) is one semaphore for all of them. When this task is aborted (the pool stops), every
/// thread stops accepting and closes its socket at once; its relays run on until they end.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    backends: Backends,
    limits: Limits,
    capacity: Arc<Capacity>,
) {
    // Dropped with this task: the threads see it closed and stop accepting.
    let (stop, stopped) = tokio::sync::watch::channel(());
    let mut unserved = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        if let Err(err) = listener.set_nonblocking(true) {
            tracing::error!("proxy: cannot use public socket {index}: {err}");
            continue;
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                tracing::error!("proxy: relay thread {index}: no runtime: {err}");
                unserved.push(listener);
                continue;
            }
        };
        // The thread gets a copy, so that the socket stays ours if it cannot start.
        let copy = match listener.try_clone() {
            Ok(copy) => copy,
            Err(err) => {
                tracing::warn!("proxy: cannot hand public socket {index} to a thread: {err}");
                unserved.push(listener);
                continue;
            }
        };
        let (backends, capacity, stopped) = (backends.clone(), capacity.clone(), stopped.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("relay-{index}"))
            .spawn(move || {
                runtime.block_on(accept_loop(copy, backends, limits, capacity, stopped))
            });
        if let Err(err) = spawned {
            tracing::warn!("proxy: cannot start relay thread {index}: {err}");
            unserved.push(listener);
        }
    }
    let _stop = stop;
    // A socket no thread took is served here, on the supervisor's thread, rather than left
    // holding connections nobody accepts.
    let mut here = tokio::task::JoinSet::new();
    for listener in unserved {
        let (backends, capacity, stopped) = (backends.clone(), capacity.clone(), stopped.clone());
        here.spawn(accept_loop(listener, backends, limits, capacity, stopped));
    }
    // Aborted with this task (a JoinSet aborts its tasks when dropped).
    std::future::pending::<()>().await
}

/// One thread's accept loop (see [`serve`]): accepts while a slot under the limit is free,
/// until `stopped` closes; then waits for the relays it started.
async fn accept_loop(
    listener: std::net::TcpListener,
    backends: Backends,
    limits: Limits,
    capacity: Arc<Capacity>,
    mut stopped: tokio::sync::watch::Receiver<()>,
) {
    let slots = &capacity.slots;
    // Accepted sockets inherit TCP_NODELAY from the listening one (one system call less per
    // connection); where it could not be set there, each connection sets it.
    let nodelay_each =
        nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::TcpNoDelay, &true)
            .is_err();
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!("proxy: cannot use the public socket: {err}");
            return;
        }
    };
    let mut relays = tokio::task::JoinSet::new();
    let accepting = async {
        let mut logged: Option<Instant> = None;
        loop {
            // Finished relays leave the set here, so it holds only the live ones.
            while relays.try_join_next().is_some() {}
            // Accept, then a free slot: at the limit each relay thread holds the one client it
            // accepted until a relay ends, and the others wait in the listen backlog. (A slot
            // taken before the accept sat on a thread whose socket stayed empty while another
            // thread's clients waited: one connection short of the limit per thread.)
            let (client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: say so, breathe, go on.
                    tracing::warn!("proxy: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let turn = backends.accepted.fetch_add(1, Ordering::Relaxed);
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let times = backends.limit_reached.fetch_add(1, Ordering::Relaxed) + 1;
                    if logged.is_none_or(|at| at.elapsed() >= LIMIT_LOG_EVERY) {
                        logged = Some(Instant::now());
                        tracing::warn!(
                            "proxy: {} connections open, the limit (--max-connections): new \
                             ones wait in the listen backlog until one ends (limit reached \
                             {times} times)",
                            capacity.max()
                        );
                    }
                    match slots.clone().acquire_owned().await {
                        Ok(permit) => permit,
                        // The semaphore is never closed; if it were, nothing more could be
                        // relayed.
                        Err(_) => return,
                    }
                }
            };
            let open = Held::new(&backends.open);
            if nodelay_each {
                let _ = client.set_nodelay(true);
            }
            relays.spawn(relay(
                client,
                peer,
                turn,
                backends.clone(),
                limits.idle_timeout,
                (permit, open),
            ));
        }
    };
    tokio::select! {
        () = accepting => {}
        // Err: the sender is gone, the pool stops.
        _ = stopped.changed() => {}
    }
    drop(listener);
    while relays.join_next().await.is_some() {}
}

/// Connects to the least busy ready worker (trying the others on refusal) and relays. `_slot`
/// (the connection's place under the limit, and its count among the open ones) is released
/// when this ends, whichever way.
///
/// A worker that dies with the connection in its accept queue, or with the client's request
/// unread in its socket, resets the connection: the relay ends with
/// [`relay::Ended::WorkerReset`], and if nothing listens on the worker's port any more (it
/// died, or closed its server) the client's unanswered bytes go to another worker, as if
/// this one had refused the connect. A worker that read the request and then died ends the
/// connection with a FIN or after a byte of its answer: that request is not sent again (the
/// app may have acted on it). See `relay::Unanswered`.
async fn relay(
    client: TcpStream,
    peer: SocketAddr,
    turn: u64,
    backends: Backends,
    idle_timeout: Option<Duration>,
    _slot: (OwnedSemaphorePermit, Held),
) {
    let unanswered = relay::Unanswered::default();
    // Workers that reset this connection and no longer listen: not tried again.
    let mut gone: Vec<i32> = Vec::new();
    // While no worker is ready (all starting or restarting), wait for one rather than refuse.
    let mut deadline = tokio::time::Instant::now() + WAIT_FOR_READY;
    // Armed only while no worker is ready: the common path takes no lock shared by the threads.
    let mut readied = None;
    'choose: loop {
        let mut candidates = match backends.sticky.load(Ordering::Relaxed) {
            0 => backends.candidates(turn),
            slots => backends.sticky_candidates(peer.ip(), slots),
        };
        candidates.retain(|c| !gone.contains(&c.pid));
        if candidates.is_empty() && readied.is_none() {
            // Listening, then looking again, so that a worker readied in between is not missed.
            let mut notified = Box::pin(backends.readied.notified());
            notified.as_mut().enable();
            readied = Some(notified);
            continue;
        }
        for candidate in candidates {
            // Counted from the attempt on, so that connections being made at the same time
            // see each other and spread instead of all choosing the same least-busy worker.
            let _active = Held::new(&candidate.active);
            let Ok(upstream) = connect_worker(candidate.port).await else {
                continue;
            };
            if let Some((bytes, ended)) = unanswered.to_resend()
                && let Err(err) = resend(&upstream, &bytes, ended).await
            {
                tracing::debug!("proxy: connection from {peer}: resend failed: {err}");
                continue;
            }
            match relay::relay(&client, &upstream, idle_timeout, &unanswered).await {
                Ok(relay::Ended::WorkerReset) => {
                    if unanswered.to_resend().is_some() && !listens(candidate.port).await {
                        backends.resent.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            "proxy: connection from {peer}: worker (pid {}) gone without \
                             reading the request; sending it to another",
                            candidate.pid
                        );
                        gone.push(candidate.pid);
                        deadline = tokio::time::Instant::now() + WAIT_FOR_READY;
                        continue 'choose;
                    }
                    tracing::debug!("proxy: connection from {peer}: reset by the worker");
                }
                Ok(relay::Ended::Idle) => tracing::debug!(
                    "proxy: connection from {peer} closed: idle for {:?} (--idle-timeout)",
                    idle_timeout.unwrap_or_default()
                ),
                Ok(ended) => tracing::trace!("proxy: connection from {peer}: {ended:?}"),
                Err(err) => tracing::debug!("proxy: connection from {peer} ended: {err}"),
            }
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        // A worker readied, or a while (one that refused may take connections again).
        match readied.take() {
            Some(notified) => {
                let _ = tokio::time::timeout(PROBE_EVERY, notified).await;
            }
            None => tokio::time::sleep(PROBE_EVERY).await,
        }
    }
    tracing::warn!("proxy: no worker ready for {peer} after {WAIT_FOR_READY:?}; connection closed");
}

/// Sends a client's unanswered bytes to a new worker connection (and its end of stream, if the
/// client ended its side): at most one buffer, which a fresh connection takes at once.
async fn resend(upstream: &TcpStream, bytes: &[u8], ended: bool) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        upstream.writable().await?;
        match upstream.try_write(&bytes[sent..]) {
            Ok(n) => sent += n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    if ended {
        nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(upstream),
            nix::sys::socket::Shutdown::Write,
        )?;
    }
    Ok(())
}

/// Whether something still listens on a worker's private port (a connect is refused once the
/// worker that listened there has died or closed its server).
async fn listens(port: u16) -> bool {
    !matches!(connect_worker(port).await, Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Connects to a worker's private port, with TCP_NODELAY. On loopback the handshake (or the
/// refusal) is over by the time connect(2) returns EINPROGRESS, so one poll(2) tells which at
/// once, where tokio's connect would wait for the runtime's next turn to ask epoll and then
/// read SO_ERROR; a connection still in progress (the worker's backlog full) is awaited.
async fn connect_worker(port: u16) -> std::io::Result<TcpStream> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
    use std::os::fd::AsFd;
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let _ = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true);
    let addr = SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(err) => return Err(err.into()),
    }
    let mut polled = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    let events = match poll(&mut polled, PollTimeout::ZERO) {
        Ok(_) => polled[0].revents().unwrap_or(PollFlags::empty()),
        Err(_) => PollFlags::empty(),
    };
    let failed = events.intersects(PollFlags::POLLERR | PollFlags::POLLHUP);
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    if !failed && events.contains(PollFlags::POLLOUT) {
        return Ok(stream);
    }
    if !failed {
        stream.writable().await?;
    }
    match stream.take_error()? {
        Some(err) => Err(err),
        None => Ok(stream),
    }
}
