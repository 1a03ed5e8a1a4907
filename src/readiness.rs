//! Readiness: how corepool learns that a worker serves (a `Ready` for the pool's loop).
//!
//! A worker is ready when it accepts connections. The Node preload writes `READY=1` to a pipe
//! (fd 4, or after the further ports' descriptors; `COREPOOL_READY_FD`) once its server is
//! listening (with `--ready-on message`, once the app calls `process.send('ready')`, as under
//! pm2's `wait_ready`); any other program may send `READY=1` to `NOTIFY_SOCKET` as systemd's
//! sd_notify does (an abstract socket named by the kernel: unique in the network namespace,
//! which a pod's containers share). In proxy mode the private port answering a connect counts
//! too (`proxy::probe`); in `none` mode a worker counts as ready when it has started.
//!
//! This module knows nothing of balance modes: `balance` and `proxy` both report through it.

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Readiness news for the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The worker's pid (for sd_notify: the sender's process group).
    pub pid: i32,
}

/// The readiness pipe of one worker: the write end goes to the worker (at a number >= 10 here,
/// see `launch::above_ten`), the read end stays with corepool until `READY=1` or EOF.
pub struct ReadyPipe {
    read: OwnedFd,
    pub write: OwnedFd,
}

impl ReadyPipe {
    pub fn open() -> io::Result<ReadyPipe> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let write = crate::launch::above_ten(write)?;
        Ok(ReadyPipe { read, write })
    }

    /// After a successful launch: closes our copy of the write end and watches the read end
    /// for `READY=1` (at most 4 KiB read), reported as `pid` ready.
    pub fn watch(self, pid: i32, tx: mpsc::UnboundedSender<Ready>) {
        let ReadyPipe { read, write } = self;
        drop(write);
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
}

/// The sd_notify socket: an abstract unix datagram socket (nothing on disk) whose name, chosen
/// by the kernel, is given to workers as NOTIFY_SOCKET. Senders are identified by the kernel (SCM_CREDENTIALS).
pub struct NotifySocket {
    fd: OwnedFd,
    name: String,
}

impl NotifySocket {
    pub fn bind() -> io::Result<NotifySocket> {
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

    /// NOTIFY_SOCKET for the workers.
    pub fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    /// Reports each `READY=1` datagram's sender (its process group: the worker) until the
    /// runtime ends.
    pub async fn serve(self, tx: mpsc::UnboundedSender<Ready>) {
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
