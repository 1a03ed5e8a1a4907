//! Balance: how N workers serve one public port, and how corepool learns a worker is ready.
//!
//! Three modes (`--balance`):
//! - `socket` (default): corepool binds the public port once, before any worker starts, and
//!   hands the listening socket to every worker as fd 3 with the systemd socket-activation
//!   variables. The kernel balances connections; nothing of ours sits in the data path. An
//!   unmodified Node server adopts the socket through a preload corepool adds to NODE_OPTIONS.
//! - `proxy`: each worker listens on a private port of its own; corepool relays (see `proxy`).
//!   The preload is loaded here too, for its drain on the stop signal (no listen redirect).
//! - `none`: no port handling at all (queue consumers), optionally PORT=base+slot.
//!
//! ## One SO_REUSEPORT socket per slot, not one shared socket
//! Both were measured on this project's 2-core test machine (Linux 6.18, Node 20, 2 workers
//! adopting the socket, HTTP requests on new connections from 1 to 64 clients at a time):
//!
//! | clients in parallel | one shared socket | one reuseport socket per slot |
//! |---|---|---|
//! | 1  (machine idle)            | 407 / 593 | 479 / 521 |
//! | 8  (machine idle)            | 498 / 502 | 486 / 514 |
//! | 64 (machine idle)            | 493 / 507 | 477 / 523 |
//! | 16 (other test pools busy)   | 739 / 269, 637 / 371 | 500 / 508 and alike |
//!
//! On an idle machine both spread well. Under CPU contention the shared socket does not: every
//! worker's epoll wakes for each connection and whichever is scheduled first accepts all that
//! are queued, so one worker took 73% (tests/port.rs, run beside the other test files). With
//! SO_REUSEPORT the kernel hashes each connection to one socket of the group: the spread no
//! longer depends on scheduling luck. Where corepool may load eBPF, `steer` replaces the hash
//! with a round robin, so that a few long-lived connections (an ingress's keep-alive pool) are
//! dealt evenly too, instead of binomially.
//!
//! ## A slot that is not ready takes no new connection
//! A socket of the group takes its share of new connections whether or not a process accepts
//! on it, so a dead, restarting or crash-looping worker's connections would wait in its
//! socket's backlog (or hang until the slot is given up). Two measures keep them out:
//! - With eBPF steering, `steer` deals connections to the *ready* slots only; the balancer
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
//! ## Launchers
//! The server may run behind a launcher (`npm start`, yarn, pnpm, npx, dotenv-cli, tsx, a Node
//! wrapper): it is a child or grandchild of the worker, and Node gives a child no descriptor above
//! 2 unless asked. The preload in the launcher (Node too) hands fd 3 and 4 on to the children it
//! starts (see `preload.cjs`). So that no process mistakes another descriptor at 3 or 4 (a
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
//! ## The port is the pool's alone
//! SO_REUSEPORT admits into the group any later listener of the same user on the same address:
//! a second corepool started on the port would start without error and, loading its own eBPF
//! program onto the group, take every connection. So `bind_group` refuses a port anything
//! listens on (a probe bound without SO_REUSEPORT, then a count of foreign listeners once the
//! group is built, for the moment between the two), and `watch_port` looks again every 2 s for
//! the pool's lifetime, failing /readyz while a stranger shares the port. The watch asks the
//! kernel (sock_diag) for the port's listeners only, so its cost does not grow with the
//! connections.
//!
//! ## Readiness
//! A worker is ready when it accepts connections. The Node preload writes `READY=1` to a pipe
//! (fd 4, or after the further ports' descriptors; `COREPOOL_READY_FD`) once its server is listening (with `--ready-on message`, once the
//! app calls `process.send('ready')`, as under pm2's `wait_ready`); any other program may send
//! `READY=1` to `NOTIFY_SOCKET` as systemd's sd_notify does (an abstract socket named by the
//! kernel: unique in the network namespace, which a pod's containers share). In `none` mode a
//! worker counts as ready when it has started.

use crate::launch::{self, WorkerIo};
use crate::metrics::Shared;
use crate::proxy::{self, Backends};
use crate::steer;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6};
use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// The preload, embedded in the binary (nothing is read from disk at run time).
const PRELOAD: &str = include_str!("preload.cjs");
/// Descriptor numbers in the worker.
const LISTEN_FD: RawFd = 3;
const READY_FD: RawFd = 4;

/// How workers share the public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Socket,
    Proxy,
    None,
}

impl Mode {
    pub fn parse(text: &str) -> Result<Mode, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "socket" => Ok(Mode::Socket),
            "proxy" => Ok(Mode::Proxy),
            "none" => Ok(Mode::None),
            other => Err(format!(
                "'{other}' is not a balance mode (socket, proxy or none)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Socket => "socket",
            Mode::Proxy => "proxy",
            Mode::None => "none",
        }
    }
}

/// Moves a descriptor to a number >= 10 (close-on-exec), so that placing handed-down
/// descriptors on 3 and 4 in a child can never overwrite another one.
fn above_ten(fd: OwnedFd) -> io::Result<OwnedFd> {
    let moved = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// Binds and listens on the public address (with SO_REUSEPORT, one of a group of sockets on the
/// same address).
pub fn bind_public(host: IpAddr, port: u16, reuseport: bool) -> io::Result<OwnedFd> {
    let fd = bind_only(host, port, reuseport)?;
    socket::listen(
        &fd,
        socket::Backlog::new(1024).unwrap_or(socket::Backlog::MAXCONN),
    )?;
    above_ten(fd)
}

/// A TCP socket bound (not listening) to the public address, with SO_REUSEADDR (so that
/// connections of an earlier run in TIME_WAIT do not matter) and, if asked, SO_REUSEPORT.
fn bind_only(host: IpAddr, port: u16, reuseport: bool) -> io::Result<OwnedFd> {
    let family = match host {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)?;
    if reuseport {
        socket::setsockopt(&fd, socket::sockopt::ReusePort, &true)?;
    }
    let addr = SocketAddr::new(host, port);
    match addr {
        SocketAddr::V4(v4) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(v4))?,
        SocketAddr::V6(v6) => {
            // `::` serves IPv4 too, as Node's own listen() would.
            socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &false)?;
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(v6))?
        }
    }
    Ok(fd)
}

/// Socket mode's group of SO_REUSEPORT listeners, one per slot, on a port nobody else listens
/// on. SO_REUSEPORT would let a listener of the same user (a second corepool, a stray server)
/// already on the port simply join the group and take connections; so first a probe binds
/// the address *without* SO_REUSEPORT, which any listener there refuses (EADDRINUSE). The
/// probe is closed before the group binds (a socket without SO_REUSEPORT would keep the group
/// out); a listener that slips in between is found by the count of foreign listeners made
/// right after, and later arrivals by the port watch.
fn bind_group(host: IpAddr, port: u16, slots: usize) -> Result<Vec<Option<OwnedFd>>, String> {
    let addr = SocketAddr::new(host, port);
    let why = |err: io::Error| {
        let what = match err.raw_os_error() {
            Some(libc::EADDRINUSE) => format!("port {port} is in use by another process ({err})"),
            _ => err.to_string(),
        };
        format!("cannot listen on {addr} (--host/--port): {what}")
    };
    drop(bind_only(host, port, false).map_err(why)?);
    let group: Vec<Option<OwnedFd>> = (0..slots)
        .map(|_| bind_public(host, port, true).map(Some))
        .collect::<io::Result<_>>()
        .map_err(why)?;
    let ours = socket_inodes(group.iter().flatten());
    match foreign_listeners(host, port, &ours) {
        Ok(foreign) if !foreign.is_empty() => Err(format!(
            "cannot listen on {addr} (--host/--port): port {port} is in use by another \
             process ({} listening socket(s) joined it with SO_REUSEPORT)",
            foreign.len()
        )),
        Ok(_) => Ok(group),
        Err(err) => {
            tracing::warn!("cannot read /proc/net/tcp to check port {port} is ours: {err}");
            Ok(group)
        }
    }
}

/// The inode numbers of sockets (as /proc/net/tcp lists them).
fn socket_inodes<'a>(fds: impl Iterator<Item = &'a OwnedFd>) -> HashSet<u64> {
    fds.filter_map(|fd| nix::sys::stat::fstat(fd).ok())
        .map(|st| st.st_ino)
        .collect()
}

/// Listening TCP sockets on `port` that accept connections meant for `host` (see
/// [`overlaps`]) and are not among `ours`: their inode numbers, in this network namespace.
pub fn foreign_listeners(host: IpAddr, port: u16, ours: &HashSet<u64>) -> io::Result<Vec<u64>> {
    let listening = match listeners_by_netlink(port) {
        Ok(listening) => listening,
        Err(err) => {
            tracing::debug!("sock_diag: {err}; reading /proc/net/tcp instead");
            listeners_by_proc(port)?
        }
    };
    Ok(listening
        .into_iter()
        .filter(|&(addr, inode)| overlaps(host, addr) && !ours.contains(&inode))
        .map(|(_, inode)| inode)
        .collect())
}

/// The listening TCP sockets on `port` (address, inode), asked of the kernel over
/// NETLINK_SOCK_DIAG as `ss -tln` does. Asked for listeners only, the kernel walks its table of
/// listening sockets and never the connections, so the cost does not grow with the traffic:
/// reading /proc/net/tcp6 instead walks every connection of the namespace. On the test machine
/// with 12,000 sockets in the namespace, one check took 0.2 ms this way and 7.2 ms by /proc.
fn listeners_by_netlink(port: u16) -> io::Result<Vec<(IpAddr, u64)>> {
    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    #[repr(C)]
    struct Request {
        nlh: libc::nlmsghdr,
        // struct inet_diag_req_v2
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        // struct inet_diag_sockid
        sport: [u8; 2],
        dport: [u8; 2],
        src: [u8; 16],
        dst: [u8; 16],
        interface: u32,
        cookie: [u32; 2],
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned this descriptor, which nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let timeout = nix::sys::time::TimeVal::new(1, 0);
    socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &timeout)?;
    let mut found = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let request = Request {
            nlh: libc::nlmsghdr {
                nlmsg_len: std::mem::size_of::<Request>() as u32,
                nlmsg_type: SOCK_DIAG_BY_FAMILY,
                nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
                nlmsg_seq: family as u32,
                nlmsg_pid: 0,
            },
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: 1 << TCP_LISTEN,
            // The kernel skips listeners of other ports.
            sport: port.to_be_bytes(),
            dport: [0; 2],
            src: [0; 16],
            dst: [0; 16],
            interface: 0,
            cookie: [0; 2],
        };
        // SAFETY: send(2) of a repr(C) value of the size given; the result is checked.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                (&request as *const Request).cast(),
                std::mem::size_of::<Request>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 32 * 1024];
        'dump: loop {
            // SAFETY: recv(2) into a buffer of the length given.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let u32_at = |b: &[u8], at: usize| {
                    b.get(at..at + 4)
                        .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
                };
                let len = u32_at(rest, 0).unwrap_or(0) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if len < 16 || len > rest.len() {
                    break;
                }
                let body = &rest[16..len];
                match kind {
                    // NLMSG_DONE
                    3 => break 'dump,
                    // NLMSG_ERROR: a negative errno.
                    2 => {
                        let errno = u32_at(body, 0).unwrap_or(0) as i32;
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    SOCK_DIAG_BY_FAMILY if body.len() >= 72 => {
                        // struct inet_diag_msg: family, state, timer, retrans, the sockid
                        // (sport at 4, source address at 8), then expires, queues, uid, inode.
                        let their_port = u16::from_be_bytes([body[4], body[5]]);
                        let src = &body[8..24];
                        let addr = match i32::from(body[0]) {
                            libc::AF_INET => IpAddr::from([src[0], src[1], src[2], src[3]]),
                            _ => IpAddr::from(<[u8; 16]>::try_from(src).unwrap_or([0; 16])),
                        };
                        let inode = u64::from(u32_at(body, 68).unwrap_or(0));
                        if their_port == port {
                            found.push((addr, inode));
                        }
                    }
                    _ => {}
                }
                rest = &rest[((len + 3) & !3).min(rest.len())..];
            }
        }
    }
    Ok(found)
}

/// The same from /proc/net/tcp{,6}, where sock_diag is missing (a kernel without inet_diag).
/// The kernel lists the listening sockets first, so reading stops at the first connection.
fn listeners_by_proc(port: u16) -> io::Result<Vec<(IpAddr, u64)>> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let file = match std::fs::File::open(table) {
            Ok(file) => file,
            // No IPv6 in this kernel or namespace.
            Err(err) if err.kind() == io::ErrorKind::NotFound && table.ends_with('6') => continue,
            Err(err) => return Err(io::Error::new(err.kind(), format!("{table}: {err}"))),
        };
        for line in io::BufRead::lines(io::BufReader::new(file)).skip(1) {
            let line = line?;
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            // Listeners (0A), then connections (SYN_RECV, 03, among them on old kernels).
            match *state {
                "0A" => {}
                "03" => continue,
                _ => break,
            }
            if let Some((addr, their_port)) = parse_proc_address(local)
                && their_port == port
            {
                found.push((addr, inode.parse().unwrap_or(0)));
            }
        }
    }
    Ok(found)
}

/// Whether a listener on `theirs` may receive connections meant for `ours` (same port): the
/// same address, or either one a wildcard of a family that serves the other's (`::` serves
/// IPv4 too, unless it is IPV6_V6ONLY, which /proc does not show: counted as serving it).
/// IPv4-mapped IPv6 addresses count as IPv4.
fn overlaps(ours: IpAddr, theirs: IpAddr) -> bool {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    let any6 = |ip: IpAddr| matches!(ip, IpAddr::V6(v6) if v6.is_unspecified());
    if any6(ours) || any6(theirs) {
        return true;
    }
    match (v4(ours), v4(theirs)) {
        (Some(a), Some(b)) => a.is_unspecified() || b.is_unspecified() || a == b,
        (None, None) => ours == theirs,
        _ => false,
    }
}

/// `0100007F:0BB8` (IPv4) or 32 hex digits and a port (IPv6), as /proc/net/tcp{,6} print
/// them: each 32-bit word in the machine's byte order.
fn parse_proc_address(text: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in addr.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((ip, port))
}

/// Who holds the socket with this inode: "pid P (comm)" of the first process found, for the
/// warning. Reads every process's descriptors: done once, when a foreign listener appears.
fn socket_holder(inode: u64) -> Option<String> {
    let target = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                let comm =
                    std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

/// How often the port watch counts the listeners on the public port.
const PORT_WATCH_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// Socket mode, for the pool's lifetime: every `PORT_WATCH_PERIOD`, counts listening sockets on
/// the public port that are not the pool's. One that joined the group (SO_REUSEPORT, same user)
/// takes a share of the connections, or all of them if it brings its own eBPF program: a
/// warning once, and /readyz fails with the reason until it is gone.
async fn watch_port(host: IpAddr, port: u16, ours: OurSockets, shared: Arc<Shared>) {
    let mut intruders: Vec<u64> = Vec::new();
    let mut read_error = false;
    let mut tick = tokio::time::interval(PORT_WATCH_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mine = ours
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let found = match foreign_listeners(host, port, &mine) {
            Ok(found) => found,
            Err(err) => {
                if !read_error {
                    tracing::warn!("port watch: cannot read the listening sockets: {err}");
                    read_error = true;
                }
                continue;
            }
        };
        match (intruders.is_empty(), found.is_empty()) {
            (true, false) => {
                let who: Vec<String> = found
                    .iter()
                    .map(|&inode| socket_holder(inode).unwrap_or(format!("socket inode {inode}")))
                    .collect();
                let why = format!(
                    "port {port} is shared with {} listening socket(s) not corepool's ({}): \
                     they take connections meant for the workers",
                    found.len(),
                    who.join(", ")
                );
                tracing::warn!("{why}; /readyz fails until they are gone");
                shared.set_port_taken(Some(why));
            }
            (false, true) => {
                tracing::info!("port {port}: the foreign listening sockets are gone");
                shared.set_port_taken(None);
            }
            _ => {}
        }
        intruders = found;
    }
}

/// The inode numbers of the pool's own sockets on the public port, shared with the port watch
/// (a scale adds and removes slot sockets).
type OurSockets = Arc<std::sync::Mutex<HashSet<u64>>>;

/// How the Node preload reaches a worker: the NODE_OPTIONS words to append.
#[derive(Debug)]
pub struct Preload {
    pub node_option: String,
    /// For the start-up log: how it was delivered and why.
    pub how: String,
    /// The file written for `--require`, removed when the pool is done with it.
    _file: Option<PreloadFile>,
}

/// The preload written to disk for a Node without `--import`: `preload.cjs` (mode 0644) in a
/// directory this process created (`corepool-<random>`, mode 0711: others may read the file by
/// its name, so workers running as another user can too, but nobody else can list, add, or
/// replace anything in it). Both are created exclusively, never through a symlink, so a name
/// planted in a shared /tmp or /dev/shm is never followed, overwritten or adopted; and only
/// what this process created is removed (on drop), never another pool's file.
#[derive(Debug)]
pub struct PreloadFile {
    pub dir: PathBuf,
    pub file: PathBuf,
}

impl Drop for PreloadFile {
    fn drop(&mut self) {
        for (what, result) in [
            (&self.file, std::fs::remove_file(&self.file)),
            (&self.dir, std::fs::remove_dir(&self.dir)),
        ] {
            if let Err(err) = result {
                tracing::warn!("cannot remove the Node preload {}: {err}", what.display());
            }
        }
    }
}

impl Preload {
    /// Chooses the delivery for the Node that will run: `--import` of a `data:` URL where that
    /// Node supports it (nothing written to disk), else `--require` of a file in the first
    /// writable of $COREPOOL_RUNTIME_DIR, /dev/shm, /tmp.
    pub fn prepare(node_version: Option<(u32, u32)>) -> io::Result<Preload> {
        let imports = match node_version {
            // `--import` came with Node 18.18 (and 20.0).
            Some((major, minor)) => major >= 19 || (major == 18 && minor >= 18),
            // No node found to ask: assume a current one.
            None => true,
        };
        let version = node_version
            .map(|(a, b)| format!("node {a}.{b}"))
            .unwrap_or_else(|| "node version unknown".into());
        if imports {
            let module = format!(
                "import {{ createRequire }} from 'node:module';\nconst require = createRequire('/corepool-preload.cjs');\n{PRELOAD}"
            );
            return Ok(Preload {
                node_option: format!(
                    "--import=data:text/javascript;base64,{}",
                    base64(module.as_bytes())
                ),
                how: format!("--import of a data: URL ({version})"),
                _file: None,
            });
        }
        let file = write_preload_file()?;
        Ok(Preload {
            node_option: format!("--require \"{}\"", file.file.display()),
            how: format!(
                "--require {} ({version} has no --import)",
                file.file.display()
            ),
            _file: Some(file),
        })
    }
}

fn write_preload_file() -> io::Result<PreloadFile> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("COREPOOL_RUNTIME_DIR") {
        dirs.push(dir.into());
    }
    dirs.extend(["/dev/shm".into(), "/tmp".into()]);
    let mut last = io::Error::other("no candidate directory");
    for dir in dirs {
        match write_preload_in(&dir, PRELOAD.as_bytes()) {
            Ok(file) => return Ok(file),
            Err(err) => last = io::Error::new(err.kind(), format!("{}: {err}", dir.display())),
        }
    }
    Err(io::Error::new(
        last.kind(),
        format!(
            "no writable directory for the Node preload ($COREPOOL_RUNTIME_DIR, /dev/shm, /tmp): {last}"
        ),
    ))
}

/// Creates `<parent>/corepool-<random>/preload.cjs` holding `text` (see [`PreloadFile`]).
pub fn write_preload_in(parent: &std::path::Path, text: &[u8]) -> io::Result<PreloadFile> {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::{Mode as Perm, fchmod, mkdirat};
    use std::io::Write;
    let parent_fd = open(
        parent,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Perm::empty(),
    )?;
    // A random name nobody can guess ahead; on the rare clash, another.
    let mut name = String::new();
    for attempt in 0.. {
        name = format!("corepool-{}", random_hex(8)?);
        // mkdir never follows a symlink at the name and fails if anything is there.
        match mkdirat(&parent_fd, name.as_str(), Perm::S_IRWXU) {
            Ok(()) => break,
            Err(nix::errno::Errno::EEXIST) if attempt < 16 => continue,
            Err(err) => return Err(err.into()),
        }
    }
    let dir = parent.join(&name);
    let created = (|| -> io::Result<std::fs::File> {
        let dir_fd = openat(
            &parent_fd,
            name.as_str(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Perm::empty(),
        )?;
        // Exact modes whatever the umask: 0711, so workers of another user reach the file.
        fchmod(&dir_fd, Perm::from_bits_truncate(0o711))?;
        let fd = openat(
            &dir_fd,
            "preload.cjs",
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Perm::S_IRUSR | Perm::S_IWUSR,
        )?;
        fchmod(&fd, Perm::from_bits_truncate(0o644))?;
        Ok(std::fs::File::from(fd))
    })();
    let mut out = match created {
        Ok(out) => out,
        Err(err) => {
            // Only the directory is ours yet.
            if let Err(rm) = std::fs::remove_dir(&dir) {
                tracing::warn!("cannot remove {}: {rm}", dir.display());
            }
            return Err(err);
        }
    };
    let made = PreloadFile {
        file: dir.join("preload.cjs"),
        dir,
    };
    out.write_all(text)?;
    Ok(made)
}

/// `bytes` random bytes from the kernel (getrandom(2), else /dev/urandom), as hex.
fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The version of the `node` that runs the command: the command itself when it is a node
/// binary, else the first `node` on PATH. Runs `node --version` once, before any worker.
pub fn node_version(program: &std::path::Path) -> Option<(u32, u32)> {
    let node = if program
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("node"))
    {
        program.to_path_buf()
    } else {
        launch::resolve_program("node", std::env::var_os("PATH")).ok()?
    };
    // std waits for this child itself; the supervisor loop (the reaper) is not running yet.
    let out = std::process::Command::new(node)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_node_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_node_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The heap share of one Node worker under a memory limit, in MiB: 70% of the limit divided
/// among the workers, leaving 30% for what V8's old-space limit does not cover (young
/// generation, code, buffers, native modules, the other processes of the container). At least
/// 64 MiB, so that a tiny limit still lets Node start. None when NODE_OPTIONS already sets it.
pub fn heap_share_mib(limit_bytes: u64, workers: usize, node_options: &str) -> Option<u64> {
    if node_options.contains("--max-old-space-size") || workers == 0 {
        return None;
    }
    let share = limit_bytes / 10 * 7 / workers as u64;
    Some((share >> 20).max(64))
}

/// Readiness news for the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The worker's pid (for sd_notify: the sender's process group).
    pub pid: i32,
}

/// The port-sharing set-up of the pool, made once at start-up.
pub struct Balancer {
    pub mode: Mode,
    host: IpAddr,
    pub port: u16,
    pub port_increment: bool,
    /// Socket mode: one SO_REUSEPORT listening socket per slot, handed to that slot's worker.
    slot_sockets: Vec<Option<OwnedFd>>,
    /// Socket mode: round-robin steering over the slot sockets, when the kernel allows it.
    steering: Option<steer::Steering>,
    /// Socket mode: each slot's processes and whether its socket is in the group.
    slot_table: std::sync::Mutex<SlotTable>,
    /// Socket mode: the kernel moves a closed listener's queued connections to another.
    migrate: bool,
    /// Socket mode: the workers are Node, which calls `listen()` on the socket it adopts.
    node_workers: bool,
    /// Socket mode: how connections are spread over the slots, for the start-up log.
    pub spread: String,
    /// Proxy mode: the public socket we accept on.
    listener: Option<OwnedFd>,
    preload: Option<Preload>,
    /// `--max-old-space-size=…` for each Node worker under a memory limit (heap share).
    heap_option: Option<String>,
    notify: Option<NotifySocket>,
    /// NOTIFY_SOCKET for the workers (the socket itself moves into its task at `start`).
    notify_env: Option<String>,
    /// Proxy mode: the workers' private ports, and the accept loop.
    backends: Backends,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    /// Socket mode: the watch for foreign listeners on the public port.
    port_watch: Option<tokio::task::JoinHandle<()>>,
    ready_tx: mpsc::UnboundedSender<Ready>,
    /// Proxy mode: `--max-connections` and `--idle-timeout`.
    proxy_limits: proxy::Limits,
    /// Socket mode: a worker is ready once it calls process.send('ready') (`--ready-on message`),
    /// not once it listens.
    ready_on_message: bool,
    /// `--stop-signal`, named to the workers for the preload's drain.
    stop_signal: nix::sys::signal::Signal,
    /// Socket mode: the ports after the first (`--port 3000,4041`), each with one SO_REUSEPORT
    /// socket per slot, handed over at fds 4.. (spread by the kernel's hash, no steering).
    extra_ports: Vec<(u16, Vec<Option<OwnedFd>>)>,
    /// Socket mode: the inodes of our sockets on the public port, for the port watch.
    ours: OurSockets,
    /// Socket mode: steering and migration were tried (a pool of one tries at its first scale
    /// up).
    group_tried: bool,
}

/// What a launch needs kept until the worker runs: the readiness pipe, the private port.
pub struct Handover {
    pub io: WorkerIo,
    slot: usize,
    ready_pipe: Option<(OwnedFd, OwnedFd)>,
    private_port: Option<u16>,
}

impl Balancer {
    pub fn new(
        mode: Mode,
        host: IpAddr,
        port: u16,
        slots: usize,
        port_increment: bool,
        preload: Option<Preload>,
        ready_tx: mpsc::UnboundedSender<Ready>,
    ) -> Result<Balancer, String> {
        let addr = SocketAddr::new(host, port);
        let listener = match mode {
            Mode::Proxy => Some(
                bind_public(host, port, false)
                    .map_err(|e| format!("cannot listen on {addr} (--host/--port): {e}"))?,
            ),
            _ => None,
        };
        let slot_sockets: Vec<Option<OwnedFd>> = match mode {
            Mode::Socket => bind_group(host, port, slots)?,
            _ => Vec::new(),
        };
        let ours = Arc::new(std::sync::Mutex::new(socket_inodes(
            slot_sockets.iter().flatten(),
        )));
        let group_tried = slot_sockets.len() > 1;
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
        let notify = match mode {
            Mode::None => None,
            _ => Some(NotifySocket::bind().map_err(|e| {
                format!("cannot create the sd_notify socket (for NOTIFY_SOCKET): {e}")
            })?),
        };
        Ok(Balancer {
            mode,
            host,
            port,
            port_increment,
            slot_sockets,
            steering,
            slot_table: std::sync::Mutex::new(slot_table),
            migrate,
            node_workers: false,
            spread,
            listener,
            preload,
            heap_option: None,
            notify_env: notify.as_ref().map(NotifySocket::env_value),
            notify,
            backends: Backends::default(),
            accept_task: None,
            port_watch: None,
            ready_tx,
            proxy_limits: proxy::Limits::default(),
            ready_on_message: false,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            extra_ports: Vec::new(),
            group_tried,
            ours,
        })
    }

    /// Proxy mode: the relay's bounds (before `start`).
    pub fn set_proxy_limits(&mut self, limits: proxy::Limits) {
        self.proxy_limits = limits;
    }

    /// Socket mode: readiness from process.send('ready') instead of the listen (`--ready-on`).
    pub fn set_ready_on_message(&mut self, on_message: bool) {
        self.ready_on_message = on_message;
    }

    /// The stop signal, passed on as COREPOOL_STOP_SIGNAL: the preload drains on it.
    pub fn set_stop_signal(&mut self, signal: nix::sys::signal::Signal) {
        self.stop_signal = signal;
    }

    /// Adds `--max-old-space-size` to every worker's NODE_OPTIONS.
    pub fn set_heap_option(&mut self, option: Option<String>) {
        self.heap_option = option;
    }

    /// Socket mode: whether the command is Node (which re-joins a slot's socket to the group
    /// itself when it listens; another program gets it listening before it starts).
    pub fn set_node_workers(&mut self, node: bool) {
        self.node_workers = node;
    }

    /// Socket mode: binds a group of per-slot sockets on each further port of `--port` (the
    /// first is bound by `new`), refusing a port another process listens on, as for the first.
    pub fn share_ports(&mut self, extra: &[u16]) -> Result<(), String> {
        if self.mode != Mode::Socket {
            return Ok(());
        }
        for &port in extra {
            let group = bind_group(self.host, port, self.slot_sockets.len())?;
            self.extra_ports.push((port, group));
        }
        Ok(())
    }

    /// Whether a worker must report readiness (else it is ready once started).
    pub fn needs_ready(&self) -> bool {
        self.mode != Mode::None
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
        match self.mode {
            Mode::None => {
                if self.port_increment {
                    let port = u32::from(self.port) + slot as u32;
                    io.env.push(("PORT".into(), port.to_string()));
                }
                io.unset.extend([
                    "LISTEN_FDS",
                    "LISTEN_PID",
                    "LISTEN_FDNAMES",
                    "NOTIFY_SOCKET",
                ]);
            }
            Mode::Proxy => {
                let port = proxy::private_port(&self.backends.ports())?;
                io.env.push(("PORT".into(), port.to_string()));
                io.env.push(("HOSTNAME".into(), "127.0.0.1".into()));
                io.unset
                    .extend(["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]);
                private_port = Some(port);
                if let Some(notify) = &self.notify_env {
                    io.env.push(("NOTIFY_SOCKET".into(), notify.clone()));
                }
            }
            Mode::Socket => {
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
                    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                        .map_err(io::Error::from)?;
                    let write = above_ten(write)?;
                    io.fds.push((write.as_raw_fd(), ready_fd));
                    io.env
                        .push(("COREPOOL_READY_FD".into(), ready_fd.to_string()));
                    // The preload uses fd 3 and 4 only when they are these very objects (a
                    // launcher's child, a node:cluster worker has other things there).
                    for (name, fd) in [
                        ("COREPOOL_LISTEN_INODE", listener),
                        ("COREPOOL_READY_INODE", &write),
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
                    ready_pipe = Some((read, write));
                }
                if let Some(notify) = &self.notify_env {
                    io.env.push(("NOTIFY_SOCKET".into(), notify.clone()));
                }
            }
        }
        let extra: Vec<&str> = [
            self.preload.as_ref().map(|p| p.node_option.as_str()),
            self.heap_option.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        if self.preload.is_some() {
            io.env.push((
                "COREPOOL_STOP_SIGNAL".into(),
                self.stop_signal.as_str().into(),
            ));
        }
        if !extra.is_empty() {
            let mut node_options = std::env::var("NODE_OPTIONS").unwrap_or_default();
            for option in extra {
                if !node_options.trim().is_empty() {
                    node_options.push(' ');
                }
                node_options.push_str(option);
            }
            io.env.push(("NODE_OPTIONS".into(), node_options));
        }
        Ok(Handover {
            io,
            slot,
            ready_pipe,
            private_port,
        })
    }

    /// After a successful launch: closes our copy of the pipe's write end and watches the read
    /// end for `READY=1`.
    pub fn watch(&self, handover: Handover, pid: i32) {
        if let Some(port) = handover.private_port {
            self.backends.add(pid, port);
            proxy::probe(self.backends.clone(), pid, port, self.ready_tx.clone());
        }
        if self.mode == Mode::Socket {
            self.with_slots(|table| {
                if let Some(state) = table.slots.get_mut(handover.slot) {
                    state.live.insert(pid);
                }
            });
        }
        let Some((read, write)) = handover.ready_pipe else {
            return;
        };
        drop(write);
        let tx = self.ready_tx.clone();
        tokio::spawn(async move {
            let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(read) else {
                return;
            };
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(7).any(|w| w == b"READY=1") {
                    let _ = tx.send(Ready { pid });
                    return;
                }
                if seen.len() > 4096 {
                    return;
                }
            }
        });
    }

    /// Starts the sd_notify listener and, in proxy mode, the accept loop (once, in the runtime).
    pub fn start(&mut self) {
        if let Some(notify) = self.notify.take() {
            tokio::spawn(notify.serve(self.ready_tx.clone()));
        }
        if self.mode == Mode::Proxy
            && let Some(listener) = self.listener.take()
        {
            let listener = std::net::TcpListener::from(listener);
            self.accept_task = Some(tokio::spawn(proxy::serve(
                listener,
                self.backends.clone(),
                self.proxy_limits,
            )));
        }
    }

    /// Socket mode: watches the public port for listeners that are not the pool's, and reports
    /// them through /readyz (once, in the runtime).
    pub fn watch_port(&mut self, shared: Arc<Shared>) {
        if self.mode == Mode::Socket && self.port_watch.is_none() {
            let ours = self.ours.clone();
            self.port_watch = Some(tokio::spawn(watch_port(self.host, self.port, ours, shared)));
        }
    }

    /// Proxy connections (open now, accepted in all), for metrics; None in the other modes.
    pub fn connections(&self) -> (Option<usize>, Option<u64>) {
        match self.mode {
            Mode::Proxy => (
                Some(self.backends.open_connections()),
                Some(self.backends.accepted()),
            ),
            _ => (None, None),
        }
    }

    /// Proxy mode: the connection limit and the times the accept loop stopped at it, for
    /// metrics; None in the other modes.
    pub fn connection_limit(&self) -> Option<(usize, u64)> {
        (self.mode == Mode::Proxy).then(|| {
            (
                self.proxy_limits.max_connections,
                self.backends.limit_reached(),
            )
        })
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

    /// Readiness news for the routing: the proxy's, or the slot's place in the group.
    pub fn worker_ready(&self, pid: i32) {
        self.backends.ready(pid);
        self.with_slots(|table| {
            let Some(slot) = table.slots.iter().position(|s| s.live.contains(&pid)) else {
                return;
            };
            table.slots[slot].ready.insert(pid);
            self.relisten(table, slot);
            self.settle(table);
        });
    }

    /// The worker is stopping or gone: route nothing new to it.
    pub fn forget(&self, pid: i32) {
        self.backends.remove(pid);
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
        self.forget(pid);
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
                }
                Err(err) => tracing::warn!("worker {s}: cannot take its socket out: {err}"),
            }
        }
        if let Some(steering) = &self.steering {
            let ready: Vec<u32> = (0..n)
                .filter(|&s| serving(table, s))
                .map(|s| s as u32)
                .collect();
            if ready != table.steered {
                match steering.set_ready(&ready) {
                    Ok(()) => table.steered = ready,
                    Err(err) => tracing::warn!("cannot update the eBPF steering: {err}"),
                }
            }
        }
    }

    /// Socket mode: the pool now has `n` slots (`corepool scale`, the CPU follow). A new slot
    /// gets a socket of the group, bound but not listening (taken out, as a dead slot's is):
    /// it joins the group when its worker listens (Node) or just before it starts (another
    /// program), and the steering deals to it once it is ready. A removed slot's sockets stay
    /// until its processes are gone (they may still accept what is queued there), then are
    /// shut down and closed: with net.ipv4.tcp_migrate_req the kernel moves what is still
    /// queued to the other sockets of the group.
    pub fn resize(&mut self, n: usize) -> io::Result<()> {
        if self.mode != Mode::Socket {
            return Ok(());
        }
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
        let spread = match steer::round_robin(&listening, crate::scale::MAX_WORKERS as u32) {
            Ok(steering) => {
                self.with_slots(|table| table.steered = (0..listening.len() as u32).collect());
                self.steering = Some(steering);
                "connections in turn (eBPF)".to_string()
            }
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
                if let Err(err) = socket::shutdown(socket.as_raw_fd(), socket::Shutdown::Read)
                    && err != nix::errno::Errno::ENOTCONN
                {
                    tracing::warn!("worker {slot} removed: cannot shut its socket down: {err}");
                }
                if let Ok(st) = nix::sys::stat::fstat(socket) {
                    ours.remove(&st.st_ino);
                }
            }
            tracing::debug!("worker {slot} removed: its sockets are closed");
        }
    }

    /// The pool is stopping: close the public socket, so that once the workers have closed
    /// theirs new connections are refused at once (and a client retries elsewhere) instead of
    /// waiting in a backlog nobody will accept from.
    pub fn close(&mut self) {
        self.listener = None;
        self.slot_sockets.clear();
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
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

/// The sd_notify socket: an abstract unix datagram socket (nothing on disk) whose name, chosen
/// by the kernel, is given to workers as NOTIFY_SOCKET. Senders are identified by the kernel (SCM_CREDENTIALS).
struct NotifySocket {
    fd: OwnedFd,
    name: String,
}

impl NotifySocket {
    fn bind() -> io::Result<NotifySocket> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        // Autobind: an empty address makes the kernel choose an abstract name unused in this
        // network namespace. A fixed name (`corepool-<pid>-notify`) was the same for every
        // PID 1, so two pools in one pod (one network namespace) collided, and any process
        // could take the name first.
        socket::bind(fd.as_raw_fd(), &socket::UnixAddr::new_unnamed())?;
        let bound: socket::UnixAddr = socket::getsockname(fd.as_raw_fd())?;
        let name = bound
            .as_abstract()
            .filter(|n| !n.is_empty() && n.iter().all(|b| b.is_ascii_graphic()))
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .ok_or_else(|| io::Error::other("the kernel gave it no printable abstract name"))?;
        socket::setsockopt(&fd, socket::sockopt::PassCred, &true)?;
        Ok(NotifySocket { fd, name })
    }

    fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    async fn serve(self, tx: mpsc::UnboundedSender<Ready>) {
        let std_socket = std::os::unix::net::UnixDatagram::from(self.fd);
        let Ok(socket) = tokio::net::UnixDatagram::from_std(std_socket) else {
            return;
        };
        let raw = socket.as_raw_fd();
        loop {
            let mut buf = [0u8; 4096];
            let received = socket
                .async_io(tokio::io::Interest::READABLE, || {
                    let mut iov = [io::IoSliceMut::new(&mut buf)];
                    let mut cmsg = nix::cmsg_space!(libc::ucred);
                    let msg = socket::recvmsg::<()>(
                        raw,
                        &mut iov,
                        Some(&mut cmsg),
                        socket::MsgFlags::MSG_DONTWAIT,
                    )
                    .map_err(io::Error::from)?;
                    let sender = msg.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|m| match m {
                            socket::ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                            _ => None,
                        })
                    });
                    Ok((msg.bytes, sender))
                })
                .await;
            let Ok((len, sender)) = received else {
                continue;
            };
            let ready = buf[..len].split(|&b| b == b'\n').any(|l| l == b"READY=1");
            if let (true, Some(pid)) = (ready, sender) {
                // The sender may be a child of the worker: its process group is the worker.
                let group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
                    .map(|p| p.as_raw())
                    .unwrap_or(pid);
                let _ = tx.send(Ready { pid: group });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar!"), "Zm9vYmFyIQ==");
    }

    #[test]
    fn node_versions() {
        assert_eq!(parse_node_version("v20.20.2\n"), Some((20, 20)));
        assert_eq!(parse_node_version("v18.19.0"), Some((18, 19)));
        assert_eq!(parse_node_version("garbage"), None);
        assert!(
            Preload::prepare(Some((22, 1)))
                .unwrap()
                .node_option
                .starts_with("--import=data:")
        );
        assert!(
            Preload::prepare(Some((18, 18)))
                .unwrap()
                .node_option
                .starts_with("--import=")
        );
        let old = Preload::prepare(Some((18, 17))).unwrap();
        assert!(
            old.node_option.starts_with("--require"),
            "{}",
            old.node_option
        );
    }

    /// Each pool gets a directory of its own (0711, ours) with the file (0644, ours) inside,
    /// and removes only those: a neighbour's file and the parent stay.
    #[test]
    fn preload_files_are_private_and_removed_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let parent = std::env::temp_dir().join(format!("corepool-unit-{}", random_hex(6).unwrap()));
        std::fs::create_dir(&parent).unwrap();
        let neighbour = parent.join("corepool-neighbour");
        std::fs::create_dir(&neighbour).unwrap();
        std::fs::write(neighbour.join("preload.cjs"), "theirs").unwrap();
        let a = write_preload_in(&parent, b"a").unwrap();
        let b = write_preload_in(&parent, b"b").unwrap();
        assert_ne!(a.dir, b.dir);
        assert_eq!(std::fs::read(&a.file).unwrap(), b"a");
        let (dir, file) = (a.dir.metadata().unwrap(), a.file.metadata().unwrap());
        assert_eq!(dir.permissions().mode() & 0o7777, 0o711);
        assert_eq!(file.permissions().mode() & 0o7777, 0o644);
        // SAFETY: geteuid has no memory effects.
        let me = unsafe { libc::geteuid() };
        assert_eq!((dir.uid(), file.uid()), (me, me));
        let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());
        drop(a);
        assert!(!a_dir.exists() && b_dir.join("preload.cjs").exists());
        drop(b);
        assert!(!b_dir.exists());
        assert_eq!(
            std::fs::read(neighbour.join("preload.cjs")).unwrap(),
            b"theirs"
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// sock_diag and /proc/net/tcp see the same listeners on a port, with the inode fstat gives.
    #[test]
    fn listeners_seen_by_netlink_and_proc() {
        let host: IpAddr = "127.0.0.1".parse().unwrap();
        let a = bind_public(host, 0, true).unwrap();
        let port = match socket::getsockname::<SockaddrIn>(a.as_raw_fd()) {
            Ok(addr) => addr.port(),
            Err(err) => panic!("getsockname: {err}"),
        };
        let b = bind_public(host, port, true).unwrap();
        let inodes = socket_inodes([&a, &b].into_iter());
        let mut by_netlink = listeners_by_netlink(port).unwrap();
        let mut by_proc = listeners_by_proc(port).unwrap();
        by_netlink.sort();
        by_proc.sort();
        assert_eq!(by_netlink, by_proc);
        let seen: HashSet<u64> = by_netlink.iter().map(|l| l.1).collect();
        assert_eq!(seen, inodes);
        assert!(by_netlink.iter().all(|l| l.0 == host));
        assert!(foreign_listeners(host, port, &inodes).unwrap().is_empty());
        let only_a = socket_inodes([&a].into_iter());
        assert_eq!(foreign_listeners(host, port, &only_a).unwrap().len(), 1);
    }

    #[test]
    fn proc_net_tcp_addresses() {
        let v4 = parse_proc_address("0100007F:0BB8").unwrap();
        assert_eq!(v4, ("127.0.0.1".parse().unwrap(), 3000));
        let any6 = parse_proc_address("00000000000000000000000000000000:1F90").unwrap();
        assert_eq!(any6, ("::".parse().unwrap(), 8080));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(overlaps(ip("127.0.0.1"), ip("::ffff:127.0.0.1")));
        assert!(overlaps(ip("0.0.0.0"), ip("10.1.2.3")));
        assert!(overlaps(ip("127.0.0.1"), ip("::")));
        assert!(overlaps(ip("::"), ip("127.0.0.1")));
        assert!(!overlaps(ip("0.0.0.0"), ip("::1")));
        assert!(!overlaps(ip("127.0.0.1"), ip("10.1.2.3")));
        assert!(!overlaps(ip("::1"), ip("fe80::1")));
        assert_eq!(parse_proc_address("zz:1"), None);
    }

    #[test]
    fn heap_shares() {
        assert_eq!(heap_share_mib(2 << 30, 2, ""), Some(716));
        assert_eq!(heap_share_mib(128 << 20, 4, ""), Some(64));
        assert_eq!(heap_share_mib(2 << 30, 2, "--max-old-space-size=100"), None);
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("Socket"), Ok(Mode::Socket));
        assert!(Mode::parse("magic").is_err());
    }
}
