//! Relay: the bytes of one proxied connection, client to worker and back.
//!
//! Most connections carry small messages (a request, its answer). Each direction reads what
//! its socket holds into the relay thread's 16 KiB buffer with recv(2) and hands it on at once
//! with send(2): two system calls per message, as HAProxy. A read that returns less than the
//! buffer has emptied the socket, so its readiness is cleared with it and the next round waits
//! for the kernel's next notice instead of reading only to be told EAGAIN. What a send could
//! not take (the other side reads slowly) is kept, at most one buffer per direction, and
//! nothing more is read until it is gone.
//!
//! A read that fills the buffer means a large transfer: that direction switches to splice(2)
//! through a pipe of its own (made at its first large transfer and kept), so the payload never
//! enters corepool's memory. Filling the pipe from one socket and draining it into the other
//! overlap, so a slow side does not stall the fast one for a whole chunk. Once the socket is
//! empty and the pipe drained, the direction goes back to recv/send (a keep-alive connection
//! that sent one large page goes on with small answers).
//!
//! When a side's end of stream is already in its socket as its last bytes are read (epoll's
//! RDHUP), those bytes are sent on with MSG_MORE, so that the end of stream that follows leaves
//! in the same segment (a worker answering `Connection: close`: one segment and one
//! acknowledgement less per connection, as HAProxy does).
//!
//! The client's end of stream becomes shutdown(SHUT_WR) towards the worker (a half-close
//! passes through: a client that stops sending still gets its whole answer); the worker's end
//! of stream, once its last bytes are handed on, ends the relay and releases both sockets and
//! any pipes at once (so a worker dropping an idle keep-alive client frees everything corepool
//! held for it). A relay also ends when either side fails, or when no byte moved either way for
//! the idle timeout. Nothing is interpreted, so WebSocket upgrades and large bodies pass
//! intact.
//!
//! What the client sent since the worker last answered is also kept (at most one buffer,
//! [`Unanswered`]): should the worker reset the connection without having read it (it died with
//! the connection in its accept queue, or the request unread in its socket), the proxy can hand
//! those bytes to another worker instead of losing the request (see `proxy`).
//!
//! At most a relay holds two sockets and two pipes (six descriptors, see `limits`), and in user
//! memory at most one buffer of unsent bytes per direction and one of unanswered bytes. What recv/send and the splice
//! switch bought over splice for every byte is measured in the README's "Design notes".

use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{MsgFlags, Shutdown, recv, send, shutdown};
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The relay thread's buffer: the most one recv takes. A read that fills it switches its
/// direction to splice.
const BUFFER: usize = 16 * 1024;

/// The capacity asked for a direction's pipe (the kernel's default, 64 KiB, if refused).
const PIPE_SIZE: usize = 256 * 1024;

/// Most unread client bytes discarded when the worker has closed (see [`relay`]).
const DISCARD_AT_MOST: usize = 256 * 1024;

/// Most client bytes kept unanswered for a resend (see [`Unanswered`]): one buffer.
const UNANSWERED_AT_MOST: usize = BUFFER;

thread_local! {
    /// Each relay thread's one buffer: bytes pass through it within one poll, never across a
    /// wait, so one per thread serves all of its relays.
    static THROUGH: RefCell<Box<[u8]>> = RefCell::new(vec![0; BUFFER].into_boxed_slice());
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both sides sent end of stream: bytes moved (client to worker, worker to client).
    Closed { up: u64, down: u64 },
    /// The worker ended its side first; everything it sent was handed to the client, which got
    /// end of stream too, and the relay was released at once.
    ByWorker { up: u64, down: u64 },
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The worker's side was reset (its socket closed with bytes of ours unread, or before it
    /// ever accepted the connection) while the client's side is still up: what the client
    /// sent since the worker's last byte is in the relay's [`Unanswered`].
    WorkerReset,
}

/// The client's bytes that the worker has not answered: everything read from the client since
/// the worker's last byte, while that is at most [`UNANSWERED_AT_MOST`] and moved by recv/send
/// (a direction that splices keeps nothing). If the worker resets the connection, these are
/// the bytes it may not have read: the proxy sends them to another worker when the first one
/// is gone (see `proxy`). A byte from the worker empties it: the request was read, whatever
/// happens next.
///
/// Both directions of one relay touch it, always from the relay's one task (a lock that is
/// never contended).
#[derive(Debug, Default)]
pub struct Unanswered {
    kept: std::sync::Mutex<Kept>,
    /// The client ended its side (after the kept bytes).
    client_ended: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
enum Kept {
    #[default]
    Nothing,
    Bytes(Vec<u8>),
    /// More than the most kept since the worker's last byte: nothing can be resent.
    TooMuch,
}

impl Unanswered {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Poisoned only by a panic while held, which leaves a valid value.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes read from the client, about to go to the worker.
    fn client_sent(&self, bytes: &[u8]) {
        let mut kept = self.kept();
        *kept = match std::mem::take(&mut *kept) {
            Kept::Nothing if bytes.len() <= UNANSWERED_AT_MOST => Kept::Bytes(bytes.to_vec()),
            Kept::Bytes(mut held) if held.len() + bytes.len() <= UNANSWERED_AT_MOST => {
                held.extend_from_slice(bytes);
                Kept::Bytes(held)
            }
            _ => Kept::TooMuch,
        };
    }

    /// The client's bytes go by splice from now on: none are kept.
    fn client_spliced(&self) {
        *self.kept() = Kept::TooMuch;
    }

    fn client_ended(&self) {
        self.client_ended.store(true, Ordering::Relaxed);
    }

    /// The worker sent something: what it was sent before was read.
    fn worker_answered(&self) {
        *self.kept() = Kept::Nothing;
    }

    /// What to send to another worker (the client's unanswered bytes, and whether the client
    /// ended its side after them), if anything can be: None when there is nothing unanswered,
    /// or more than was kept.
    pub fn to_resend(&self) -> Option<(Vec<u8>, bool)> {
        match &*self.kept() {
            Kept::Bytes(bytes) => Some((bytes.clone(), self.client_ended.load(Ordering::Relaxed))),
            Kept::Nothing | Kept::TooMuch => None,
        }
    }
}

/// Which way a [`one_way`] moves bytes, with what it tells the relay's [`Unanswered`].
#[derive(Clone, Copy)]
enum Way<'a> {
    /// Client to worker.
    Up(&'a Unanswered),
    /// Worker to client.
    Down(&'a Unanswered),
}

impl Way<'_> {
    fn read(self, bytes: &[u8]) {
        match self {
            Way::Up(unanswered) => unanswered.client_sent(bytes),
            Way::Down(unanswered) => unanswered.worker_answered(),
        }
    }

    fn spliced(self) {
        match self {
            Way::Up(unanswered) => unanswered.client_spliced(),
            Way::Down(unanswered) => unanswered.worker_answered(),
        }
    }

    fn ended(self) {
        if let Way::Up(unanswered) = self {
            unanswered.client_ended();
        }
    }
}

/// A TCP socket's TCP_INFO (its state, a listener's accept queue in `tcpi_unacked`, ...).
pub(crate) fn tcp_info(socket: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data, valid zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which has that many.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    match rc {
        0 => Ok(info),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The TCP state of a socket (`TCP_CLOSE` after a reset).
fn tcp_state(socket: &TcpStream) -> Option<u8> {
    tcp_info(socket).ok().map(|info| info.tcpi_state)
}

/// Whether a relay that failed did so because the worker reset its side, the client's still
/// being up.
fn worker_reset(client: &TcpStream, worker: &TcpStream) -> bool {
    const TCP_CLOSE: u8 = 7;
    tcp_state(worker) == Some(TCP_CLOSE) && tcp_state(client).is_some_and(|s| s != TCP_CLOSE)
}

/// When bytes last moved on a relay, either way.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last chunk moved.
    last: AtomicU64,
}

impl Activity {
    fn note(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// Relays between `client` and `worker` until it ends (see [`Ended`]), or until one side
/// fails.
///
/// A client's end of stream is passed on as a half-close (the worker still answers a client
/// that stopped sending). The worker's end of stream ends the relay as soon as what it sent is
/// handed to the client's socket: a worker that closed a connection (its keep-alive timeout,
/// a stop) must not leave corepool holding the client, two sockets and a pipe until that client
/// leaves. Client bytes already received but not yet read are discarded first (at most 256
/// KiB), so that closing the client's socket sends a FIN after the answer and not a reset in
/// front of it. With `idle_timeout`, a relay on which no byte moved for that long is closed.
/// `unanswered` keeps the client's bytes the worker has not answered yet (see [`Unanswered`]);
/// a relay that ends because the worker reset its side returns [`Ended::WorkerReset`].
pub async fn relay(
    client: &TcpStream,
    worker: &TcpStream,
    idle_timeout: Option<Duration>,
    unanswered: &Unanswered,
) -> io::Result<Ended> {
    match relay_until_end(client, worker, idle_timeout, unanswered).await {
        Err(_) if worker_reset(client, worker) => Ok(Ended::WorkerReset),
        ended => ended,
    }
}

async fn relay_until_end(
    client: &TcpStream,
    worker: &TcpStream,
    idle_timeout: Option<Duration>,
    unanswered: &Unanswered,
) -> io::Result<Ended> {
    let activity = Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
    };
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let moving = async {
        // The client's request is usually there already: read it before the runtime's turn.
        let up = one_way(
            client,
            worker,
            Way::Up(unanswered),
            &activity,
            &up_bytes,
            true,
        );
        // The relay ends with the worker's end of stream and closes the client's socket, which
        // tells the client: no shutdown needed on that side.
        let down = one_way(
            worker,
            client,
            Way::Down(unanswered),
            &activity,
            &down_bytes,
            false,
        );
        tokio::pin!(up, down);
        let by_worker = tokio::select! {
            result = &mut down => {
                result?;
                // `up` is dropped unfinished: its pipe is closed, and what it held was for a
                // worker that no longer reads.
                discard_unread(client);
                true
            }
            result = &mut up => {
                result?;
                down.await?;
                false
            }
        };
        let (up, down) = (
            up_bytes.load(Ordering::Relaxed),
            down_bytes.load(Ordering::Relaxed),
        );
        Ok(match by_worker {
            true => Ended::ByWorker { up, down },
            false => Ended::Closed { up, down },
        })
    };
    let Some(limit) = idle_timeout else {
        return moving.await;
    };
    let idle = async {
        // One timer per relay, re-armed only when it fires early.
        loop {
            let deadline = activity.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        ended = moving => ended,
        () = idle => Ok(Ended::Idle),
    }
}

/// Reads and drops what the client sent that nobody will read, without waiting for more.
fn discard_unread(client: &TcpStream) {
    let mut buf = [0u8; 4096];
    let mut dropped = 0;
    while dropped < DISCARD_AT_MOST {
        match recv(client.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(_) => return,
            Ok(n) => dropped += n,
        }
    }
}

/// What one read without waiting gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Bytes(usize),
    /// End of stream.
    End,
    /// Nothing now: wait for readiness.
    Nothing,
}

impl From<Option<usize>> for Got {
    /// What a read's count means: `None` from [`attempt`] or [`unguarded`] is "not now".
    fn from(read: Option<usize>) -> Got {
        match read {
            None => Got::Nothing,
            Some(0) => Got::End,
            Some(n) => Got::Bytes(n),
        }
    }
}

/// Whether an error only means "not now".
fn not_now(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Runs `op` on `socket` if tokio last saw it ready for `interest`, and clears that readiness
/// when `op` says the socket is exhausted (`Ok((value, true))`: a short read or write, which
/// empties or fills it) as well as on EAGAIN. Clearing goes by the readiness tick taken before
/// `op` ran, so a notice that arrived meanwhile is kept and nothing is missed. `None`: not
/// ready, or EAGAIN.
fn attempt<T>(
    socket: &TcpStream,
    interest: Interest,
    op: impl FnOnce() -> io::Result<(T, bool)>,
) -> io::Result<Option<T>> {
    let mut done = None;
    let result = socket.try_io(interest, || {
        let (value, exhausted) = op()?;
        done = Some(value);
        match exhausted {
            true => Err(io::ErrorKind::WouldBlock.into()),
            false => Ok(()),
        }
    });
    match result {
        Err(err) if !not_now(&err) => Err(err),
        _ => Ok(done),
    }
}

/// Runs `op` regardless of what tokio last saw and clears nothing: for a socket whose readiness
/// it has not seen yet (a connection just made: its first notice comes with the runtime's next
/// turn), or where an EAGAIN may not be the socket's (a splice into a pipe that may be full).
/// An EAGAIN here (`None`) leaves the wait for the socket's next notice intact.
fn unguarded<T>(op: impl FnOnce() -> nix::Result<T>) -> io::Result<Option<T>> {
    match op() {
        Ok(value) => Ok(Some(value)),
        Err(err) => {
            let err = io::Error::from(err);
            match not_now(&err) {
                true => Ok(None),
                false => Err(err),
            }
        }
    }
}

/// recv(2) into `buf` without waiting. `speculative`: also when tokio has not seen the socket
/// readable (a new client's request is usually there when it is accepted, as HAProxy bets too).
fn read_now(from: &TcpStream, buf: &mut [u8], speculative: bool) -> io::Result<Got> {
    let room = buf.len();
    let mut asked = false;
    let mut got = attempt(from, Interest::READABLE, || {
        asked = true;
        let n = recv(from.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT)?;
        // A short read took everything the socket had.
        Ok((n, n > 0 && n < room))
    })?;
    if !asked && speculative {
        got = unguarded(|| recv(from.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT))?;
    }
    Ok(got.into())
}

/// send(2) of as much of `bytes` as `to` takes now: how much it took. Tried also when tokio has
/// not seen the socket writable (a worker connection just made takes the request at once).
/// `last`: the sender's end of stream follows these bytes at once, so they are sent with
/// MSG_MORE and the end of stream (a shutdown or close moments later) leaves in the same
/// segment: one segment and one acknowledgement less per connection the worker closes.
fn write_now(to: &TcpStream, bytes: &[u8], last: bool) -> io::Result<usize> {
    let mut flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    if last {
        // Not among nix's flags.
        flags |= MsgFlags::from_bits_retain(libc::MSG_MORE);
    }
    let mut asked = false;
    let mut sent = attempt(to, Interest::WRITABLE, || {
        asked = true;
        let n = send(to.as_raw_fd(), bytes, flags)?;
        // A short write filled the socket's buffer.
        Ok((n, n < bytes.len()))
    })?;
    if !asked {
        sent = unguarded(|| send(to.as_raw_fd(), bytes, flags))?;
    }
    Ok(sent.unwrap_or(0))
}

/// A direction's pipe for large transfers: (read end, write end).
struct Pipe {
    out: OwnedFd,
    into: OwnedFd,
    /// What one splice into it asks for: its capacity.
    capacity: usize,
}

impl Pipe {
    /// Non-blocking and close-on-exec (a worker started later must not inherit it), enlarged
    /// to `PIPE_SIZE` where the kernel allows (past the user's pipe allowance it does not, and
    /// the default 64 KiB serves).
    fn new() -> io::Result<Pipe> {
        let (out, into) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        let capacity = fcntl(&into, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .map_or(64 * 1024, |size| size as usize);
        Ok(Pipe {
            out,
            into,
            capacity,
        })
    }
}

const SPLICE: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// splice(2) from `from` into the pipe, which holds `held` bytes, without waiting. With the
/// pipe empty an EAGAIN can only be the socket's, so it clears the socket's readiness; with
/// bytes in the pipe it may mean the pipe is full, and the readiness is kept.
fn fill_now(from: &TcpStream, pipe: &Pipe, held: usize) -> io::Result<Got> {
    let take = || {
        splice(
            from.as_fd(),
            None,
            pipe.into.as_fd(),
            None,
            pipe.capacity,
            SPLICE,
        )
    };
    let got = match held {
        0 => attempt(from, Interest::READABLE, || Ok((take()?, false)))?,
        _ => unguarded(take)?,
    };
    Ok(got.into())
}

/// splice(2) of up to `held` bytes from the pipe into `to` without waiting: how many went.
fn drain_now(pipe: &Pipe, to: &TcpStream, held: usize) -> io::Result<usize> {
    let sent = attempt(to, Interest::WRITABLE, || {
        let n = splice(pipe.out.as_fd(), None, to.as_fd(), None, held, SPLICE)?;
        Ok((n, n < held))
    })?;
    Ok(sent.unwrap_or(0))
}

/// How a stretch of splicing ended.
enum Spliced {
    /// The socket is empty and the pipe drained: back to recv/send.
    Drained,
    /// End of stream, everything before it handed on.
    End,
}

/// Moves everything `from` sends to `to`; at its end of stream, half-closes `to` if the way
/// is up (client to worker). `speculate`: the first read is tried before tokio has seen `from`
/// readable. Each chunk moved is counted in `moved`, noted in `activity` and told to `way`.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    way: Way<'_>,
    activity: &Activity,
    moved: &AtomicU64,
    mut speculate: bool,
) -> io::Result<()> {
    // Bytes read but not yet taken by `to`.
    let mut unsent: Vec<u8> = Vec::new();
    let mut pipe: Option<Pipe> = None;
    let mut large = false;
    loop {
        while !unsent.is_empty() {
            to.writable().await?;
            let n = write_now(to, &unsent, false)?;
            if n > 0 {
                activity.note();
                unsent.drain(..n);
            }
        }
        // Let an idle connection hold no buffer.
        unsent = Vec::new();
        if large {
            large = false;
            way.spliced();
            let pipe = match &mut pipe {
                Some(pipe) => pipe,
                None => pipe.insert(Pipe::new()?),
            };
            // Boxed: its state (424 bytes) would otherwise be part of every relay's, idle
            // keep-alive connections included, in both directions.
            match Box::pin(splice_while_large(from, to, pipe, activity, moved)).await? {
                Spliced::Drained => {}
                Spliced::End => break,
            }
        }
        // Whether the sender's end of stream had arrived when its socket was last seen
        // readable (epoll's RDHUP; tokio keeps it once seen): then a short read takes the last
        // bytes before it, and the next read sees the end.
        let ending = match speculate {
            true => false,
            false => from.ready(Interest::READABLE).await?.is_read_closed(),
        };
        let got = THROUGH.with_borrow_mut(|buf| -> io::Result<Got> {
            let got = read_now(from, buf, std::mem::take(&mut speculate))?;
            if let Got::Bytes(n) = got {
                way.read(&buf[..n]);
                let sent = write_now(to, &buf[..n], ending && n < BUFFER)?;
                unsent.extend_from_slice(&buf[sent..n]);
            }
            Ok(got)
        })?;
        match got {
            Got::Nothing => {}
            Got::End => break,
            Got::Bytes(n) => {
                activity.note();
                moved.fetch_add(n as u64, Ordering::Relaxed);
                large = n == BUFFER;
            }
        }
    }
    way.ended();
    if let Way::Up(_) = way {
        match shutdown(to.as_raw_fd(), Shutdown::Write) {
            // The other side is already gone: nothing left to tell it.
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Splices from `from` into `pipe` and from `pipe` into `to`, both as far as each side allows,
/// until the socket is empty with the pipe drained, or end of stream.
async fn splice_while_large(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    activity: &Activity,
    moved: &AtomicU64,
) -> io::Result<Spliced> {
    let mut held = 0;
    let mut ended = false;
    // The last fill found nothing while the pipe held bytes: it may be full, so only draining
    // it helps.
    let mut full = false;
    loop {
        let mut progress = false;
        if !ended && !full {
            match fill_now(from, pipe, held)? {
                Got::Bytes(n) => {
                    held += n;
                    progress = true;
                    activity.note();
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                }
                Got::End => ended = true,
                Got::Nothing if held == 0 => return Ok(Spliced::Drained),
                Got::Nothing => full = true,
            }
        }
        if held > 0 {
            let n = drain_now(pipe, to, held)?;
            if n > 0 {
                held -= n;
                progress = true;
                full = false;
                activity.note();
            }
        }
        if ended && held == 0 {
            return Ok(Spliced::End);
        }
        if progress {
            continue;
        }
        if held == 0 {
            from.readable().await?;
        } else if full || ended {
            to.writable().await?;
        } else {
            tokio::select! {
                ready = to.writable() => ready?,
                ready = from.readable() => ready?,
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client <-> [near | relay | far] <-> server, the relay running: (client, server, relay).
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<Ended>>,
    ) {
        let (client, near) = pair().await;
        let (far, server) = pair().await;
        let relaying =
            tokio::spawn(async move { relay(&near, &far, None, &Unanswered::default()).await });
        (client, server, relaying)
    }

    /// client <-> [near | relay | far] <-> server: bytes arrive intact both ways, and a
    /// half-close from the client still lets the server's answer through.
    #[tokio::test]
    async fn relays_both_ways_and_passes_a_half_close() {
        let (mut client, mut server, relaying) = relayed().await;
        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == request, "request corrupted ({} bytes)", got.len());
        server.write_all(b"thanks").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"thanks");
        assert_eq!(
            relaying.await.unwrap().unwrap(),
            Ended::Closed {
                up: 3_000_000,
                down: 6
            }
        );
    }

    /// A worker that closes right after its answer: the client gets the answer's last bytes and
    /// the end of stream in one segment, as HAProxy sends them (without MSG_MORE: two).
    #[tokio::test]
    async fn the_last_bytes_and_the_end_of_stream_leave_in_one_segment() {
        let (mut client, mut server, relaying) = relayed().await;
        let before = tcp_info(&client).unwrap().tcpi_segs_in;
        // Both are in the relay's socket before the relay first looks (this runtime runs it
        // only once the test waits below).
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        let segments = tcp_info(&client).unwrap().tcpi_segs_in - before;
        assert_eq!(segments, 1, "segments that brought the answer and the end");
        assert_eq!(
            relaying.await.unwrap().unwrap(),
            Ended::ByWorker { up: 0, down: 3 }
        );
    }

    /// A pattern that shows any byte lost, doubled or out of place.
    fn pattern(n: usize, seed: usize) -> Vec<u8> {
        (0..n)
            .map(|i| ((i * 31 + (i >> 9) + seed) % 251) as u8)
            .collect()
    }

    /// One keep-alive connection carries a large answer (the direction switches to splice)
    /// and then small exchanges (back to recv/send), each intact and in order.
    #[tokio::test]
    async fn a_large_answer_then_small_exchanges_on_one_connection() {
        let (mut client, mut server, relaying) = relayed().await;
        let large = pattern(5_000_000, 1);
        let sent = large.clone();
        let serving = tokio::spawn(async move {
            let mut ask = [0u8; 5];
            server.read_exact(&mut ask).await.unwrap();
            assert_eq!(&ask, b"large");
            server.write_all(&sent).await.unwrap();
            for i in 0..200u32 {
                let mut ping = [0u8; 4];
                server.read_exact(&mut ping).await.unwrap();
                assert_eq!(u32::from_be_bytes(ping), i);
                server.write_all(&(i * 7).to_be_bytes()).await.unwrap();
            }
            server.shutdown().await.unwrap();
        });
        client.write_all(b"large").await.unwrap();
        let mut got = vec![0u8; large.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == large, "the large answer differs");
        for i in 0..200u32 {
            client.write_all(&i.to_be_bytes()).await.unwrap();
            let mut pong = [0u8; 4];
            client.read_exact(&mut pong).await.unwrap();
            assert_eq!(u32::from_be_bytes(pong), i * 7);
        }
        serving.await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        match relaying.await.unwrap().unwrap() {
            Ended::ByWorker { up, down } => {
                assert_eq!((up, down), (5 + 800, 5_000_000 + 800));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A client that does not read while the worker sends many small messages: the relay
    /// keeps what the client's socket cannot take (the worker is held back, not buffered
    /// without bound), and once the client reads, every byte arrives in order.
    #[tokio::test]
    async fn small_messages_to_a_client_that_reads_late_arrive_whole() {
        let (mut client, mut server, relaying) = relayed().await;
        let stream = pattern(40_000_000, 2);
        let sent = stream.clone();
        let serving = tokio::spawn(async move {
            // 3 KiB writes: each read by the relay is short, so it stays on recv/send.
            for chunk in sent.chunks(3000) {
                server.write_all(chunk).await.unwrap();
            }
            server.shutdown().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !serving.is_finished(),
            "40 MB went nowhere while the client read nothing"
        );
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        serving.await.unwrap();
        assert!(got == stream, "the stream differs ({} bytes)", got.len());
        relaying.await.unwrap().unwrap();
    }

    /// Closes a socket with a reset (SO_LINGER 0), as the kernel does for one whose process
    /// died with bytes unread in it.
    fn reset(socket: TcpStream) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Linger, &linger).unwrap();
        drop(socket);
    }

    /// A worker that resets the connection: the relay says so, and keeps what the client
    /// sent since the worker's last byte (and nothing once that is more than one buffer).
    #[tokio::test]
    async fn a_worker_reset_keeps_what_it_left_unanswered() {
        for (exchanges, then, kept) in [
            (0, &b"GET / one"[..], Some(&b"GET / one"[..])),
            (2, b"GET / three", Some(b"GET / three")),
            (0, &[7u8; 40_000][..], None),
        ] {
            let (mut client, near) = pair().await;
            let (far, mut server) = pair().await;
            let unanswered = std::sync::Arc::new(Unanswered::default());
            let kept_here = unanswered.clone();
            let relaying = tokio::spawn(async move { relay(&near, &far, None, &kept_here).await });
            for _ in 0..exchanges {
                client.write_all(b"ping").await.unwrap();
                let mut ping = [0u8; 4];
                server.read_exact(&mut ping).await.unwrap();
                server.write_all(b"pong").await.unwrap();
                client.read_exact(&mut ping).await.unwrap();
            }
            client.write_all(then).await.unwrap();
            // The bytes reach the worker's socket, unread, before it resets.
            let deadline = Instant::now() + Duration::from_secs(10);
            let unread = || {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int into n.
                unsafe { libc::ioctl(server.as_raw_fd(), libc::FIONREAD, &mut n) };
                n as usize
            };
            while unread() < then.len() {
                assert!(Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reset(server);
            assert_eq!(relaying.await.unwrap().unwrap(), Ended::WorkerReset);
            assert_eq!(
                unanswered.to_resend().map(|(bytes, _)| bytes),
                kept.map(|k| k.to_vec()),
                "after {exchanges} exchanges"
            );
            drop(client);
        }
    }
}
