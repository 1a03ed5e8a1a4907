//! What a socket-mode worker is handed at start: its slot's listening socket at fd 3 (the
//! further ports' at 4..), the readiness pipe after them, and the socket-activation and
//! `COREPOOL_*` variables that name them to the preload.

use crate::launch::WorkerIo;
use crate::readiness::ReadyPipe;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Descriptor numbers in the worker.
const LISTEN_FD: RawFd = 3;
const READY_FD: RawFd = 4;

/// Hands slot `slot`'s `listener` (and its sockets of `extra_ports`) to a worker about to
/// start, with the variables naming them, and opens its readiness pipe.
pub(super) fn hand_over(
    listener: &OwnedFd,
    slot: usize,
    extra_ports: &[(u16, Vec<Option<OwnedFd>>)],
    port: u16,
    ready_on_message: bool,
    io: &mut WorkerIo,
    ready_pipe: &mut Option<ReadyPipe>,
) -> io::Result<()> {
    io.fds.push((listener.as_raw_fd(), LISTEN_FD));
    // The further ports follow at 4.. (systemd's order: LISTEN_FDS of them
    // from fd 3), named in COREPOOL_EXTRA_PORTS as port:fd:inode for the
    // preload; the readiness pipe comes after them.
    let mut extra = Vec::new();
    let mut next_fd = LISTEN_FD + 1;
    for (port, group) in extra_ports {
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
        std::iter::once(format!("port-{}", port))
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
        .push(("COREPOOL_PUBLIC_PORT".into(), port.to_string()));
    io.env.push(("PORT".into(), port.to_string()));
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
    let ready_on = if ready_on_message {
        "message"
    } else {
        "listen"
    };
    io.env.push(("COREPOOL_READY_ON".into(), ready_on.into()));
    *ready_pipe = Some(pipe);
    Ok(())
}
