//! The writer threads: the only code that writes to corepool's fd 1 and fd 2, one thread per
//! stream, fed through a queue whose size is bounded in bytes by a semaphore (the budget).

use super::{LINE_OVERHEAD, STREAM_BUDGET};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// A formatted line on its way to a writer, with the share of the byte budget it holds; the
/// share goes back when the writer drops the line after writing it.
pub(super) struct Queued {
    pub(super) bytes: Vec<u8>,
    pub(super) _charge: OwnedSemaphorePermit,
}

/// The way into one writer thread: its queue and the byte budget that bounds it.
#[derive(Clone)]
pub(super) struct Sink {
    pub(super) queue: mpsc::UnboundedSender<Queued>,
    pub(super) budget: Arc<Semaphore>,
}

/// Budget units (bytes) a line of `len` bytes costs, never more than the whole `budget` (so a
/// line bigger than the budget waits for an empty queue instead of forever).
pub(super) fn charge(len: usize, budget: usize) -> u32 {
    u32::try_from((len + LINE_OVERHEAD).min(budget)).unwrap_or(u32::MAX)
}

/// Where a writer thread writes: corepool's own stdout or stderr.
#[derive(Clone, Copy)]
pub(super) enum Target {
    Stdout,
    Stderr,
}

pub(super) fn spawn_writer(
    to: Target,
    name: &str,
    done: std::sync::mpsc::Sender<()>,
) -> std::io::Result<Sink> {
    let (queue, mut rx) = mpsc::unbounded_channel::<Queued>();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // Written with write(2) on the descriptor itself: std's Stdout would buffer lines
            // and take a lock that corepool's own messages must never wait on.
            let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
            let target = match to {
                Target::Stdout => stdout.as_fd(),
                Target::Stderr => stderr.as_fd(),
            };
            let mut broken = false;
            while let Some(line) = rx.blocking_recv() {
                if !broken && write_fully(target, &line.bytes).is_err() {
                    // A closed or failing stdout must not kill the pool: drop output from now on.
                    broken = true;
                }
                // Dropping the line here gives its bytes back to the budget.
            }
            let _ = done.send(());
        })?;
    Ok(Sink {
        queue,
        budget: Arc::new(Semaphore::new(STREAM_BUDGET)),
    })
}

/// Writes all of `bytes`, waiting for the fd to become writable if it is non-blocking.
fn write_fully(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
