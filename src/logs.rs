//! Logs: worker output and corepool's own messages, written a whole line at a time.
//!
//! Each worker's stdout and stderr are pipes read by a small async task (a *pump*) that cuts the
//! byte stream into lines and formats each one (`raw`, `prefix` or `json`). Finished lines go
//! through a queue to one writer thread per output stream, the only code that writes to
//! corepool's fd 1 or fd 2. One writer per stream means lines from different workers never
//! interleave mid-line, whatever their length; a thread means a reader that stops reading our
//! stdout blocks only that thread, never the supervisor loop, so signals and reaping go on. A
//! line longer than [`MAX_LINE`] is cut into pieces, each but the last marked as split.
//!
//! Memory is bounded in bytes, not lines: each output stream has a budget of
//! [`STREAM_BUDGET`] bytes shared by all workers. A pump works out the exact size of a
//! formatted line first, takes that many bytes (plus [`LINE_OVERHEAD`]) from the budget,
//! waiting if need be, and only then builds the line; the writer gives the bytes back once the
//! line is written. When the budget is used up (our stdout is not being read), pumps stop
//! reading, the workers' pipes fill and the workers block on write: nothing grows. Besides
//! the budgets, each pump holds at most one read chunk, one unfinished line and the piece it
//! is formatting, so at most about [`MAX_LINE`] + 64 KiB more per pipe.
//!
//! corepool's own messages (tracing events) are formatted here too, in the same format, and
//! queued to the stderr writer without ever waiting, against a budget of their own
//! ([`OWN_BUDGET`]), so a flood of worker output cannot crowd them out. When even that is full
//! (stderr not read) they are dropped and counted, and the count is reported in a message once
//! there is room again: PID 1 never stalls on logging.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Longest line passed on whole; longer ones are split into pieces of this size.
pub const MAX_LINE: usize = 256 * 1024;
/// Marker appended to every piece of a split line but the last (raw and prefix formats).
pub const SPLIT_MARK: &str = " [corepool: line split]";
/// Bytes of formatted worker lines queued per output stream, all workers together, before
/// pumps wait (and the workers' pipes fill). Larger than any one formatted line: a
/// [`MAX_LINE`] piece of control bytes is 6 x 256 KiB in JSON.
pub const STREAM_BUDGET: usize = 2 * 1024 * 1024;
/// Bytes of corepool's own messages queued; beyond that they are dropped and counted.
pub const OWN_BUDGET: usize = 256 * 1024;
/// What a queued line is charged beyond its bytes: its queue slot and allocator rounding, so
/// that a flood of empty lines is bounded too.
pub const LINE_OVERHEAD: usize = 64;
/// Size of a pump's read buffer.
const CHUNK: usize = 64 * 1024;
/// Keys of a worker's JSON line that corepool sets itself; the worker's own values for them
/// are kept under `app_<key>` (see [`json_body`]).
pub const RESERVED_KEYS: [&str; 6] = ["ts", "worker", "pid", "stream", "source", "split"];

/// How worker lines and corepool's messages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines exactly as the worker wrote them.
    Raw,
    /// `[<slot>:<pid>] ` before each line.
    Prefix,
    /// One JSON object per line: `{"ts","worker","pid","stream","msg"}`.
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Result<LogFormat, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "raw" => Ok(LogFormat::Raw),
            "prefix" => Ok(LogFormat::Prefix),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "'{other}' is not a log format (raw, prefix or json)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Raw => "raw",
            LogFormat::Prefix => "prefix",
            LogFormat::Json => "json",
        }
    }
}

/// Which of a worker's output streams a line came from (and which of ours it goes to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A formatted line on its way to a writer, with the share of the byte budget it holds; the
/// share goes back when the writer drops the line after writing it.
struct Queued {
    bytes: Vec<u8>,
    _charge: OwnedSemaphorePermit,
}

/// The way into one writer thread: its queue and the byte budget that bounds it.
#[derive(Clone)]
struct Sink {
    queue: mpsc::UnboundedSender<Queued>,
    budget: Arc<Semaphore>,
}

/// Budget units (bytes) a line of `len` bytes costs, never more than the whole `budget` (so a
/// line bigger than the budget waits for an empty queue instead of forever).
fn charge(len: usize, budget: usize) -> u32 {
    u32::try_from((len + LINE_OVERHEAD).min(budget)).unwrap_or(u32::MAX)
}

/// The two writer threads and the senders that feed them.
pub struct Output {
    pub format: LogFormat,
    stdout: Sink,
    stderr: Sink,
    own_budget: Arc<Semaphore>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Output {
    /// Starts one writer thread for fd 1 and one for fd 2.
    pub fn start(format: LogFormat) -> std::io::Result<Output> {
        let (done_tx, done) = std::sync::mpsc::channel();
        let stdout = spawn_writer(Target::Stdout, "corepool-stdout", done_tx.clone())?;
        let stderr = spawn_writer(Target::Stderr, "corepool-stderr", done_tx)?;
        Ok(Output {
            format,
            stdout,
            stderr,
            own_budget: Arc::new(Semaphore::new(OWN_BUDGET)),
            done,
        })
    }

    /// Routes corepool's own tracing events to the stderr writer, in `format`.
    pub fn install_tracing(&self, level: tracing::level_filters::LevelFilter) {
        // A weak sender: the global subscriber must not keep the stderr writer open after
        // `finish`, or exit would wait out the whole grace period.
        let layer = EventLayer {
            format: self.format,
            queue: self.stderr.queue.downgrade(),
            budget: self.own_budget.clone(),
            dropped: AtomicU64::new(0),
        };
        // Only fails if a subscriber is already set (tests calling twice): keep the first.
        let _ = tracing_subscriber::registry()
            .with(level)
            .with(layer)
            .try_init();
    }

    /// Starts a pump for one of a worker's output pipes.
    pub fn pump(&self, pipe: OwnedFd, stream: Stream, slot: usize, pid: i32) -> PumpHandle {
        self.pump_in("", pipe, stream, slot, pid)
    }

    /// `pump` for a worker of the pool named `pool` (several pools in one container): its
    /// lines name the pool (`[web/0:pid]`, `"pool":"web"`).
    pub fn pump_in(
        &self,
        pool: &str,
        pipe: OwnedFd,
        stream: Stream,
        slot: usize,
        pid: i32,
    ) -> PumpHandle {
        let sink = match stream {
            Stream::Stdout => self.stdout.clone(),
            Stream::Stderr => self.stderr.clone(),
        };
        let origin = Arc::new(Origin {
            format: self.format,
            stream,
            slot,
            pid,
            pool: pool.to_string(),
        });
        PumpHandle(tokio::spawn(pump(pipe, origin, sink)))
    }

    /// Lets the writers drain what they hold and waits up to `grace` for them to finish; a
    /// writer blocked on a reader that never reads is abandoned, so exit is never held up.
    pub fn finish(self, grace: Duration) {
        let Output {
            stdout,
            stderr,
            done,
            ..
        } = self;
        drop(stdout);
        drop(stderr);
        let deadline = std::time::Instant::now() + grace;
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done.recv_timeout(left).is_err() {
                break;
            }
        }
    }
}

/// A running pump; finished when the pipe reaches end of file (every writer closed it).
pub struct PumpHandle(tokio::task::JoinHandle<()>);

impl PumpHandle {
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Stops reading (used when a descendant keeps the pipe open after the pool has stopped).
    pub fn abort(&self) {
        self.0.abort()
    }
}

/// Where a writer thread writes: corepool's own stdout or stderr.
#[derive(Clone, Copy)]
enum Target {
    Stdout,
    Stderr,
}

fn spawn_writer(
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

/// Where a worker line came from: everything a formatted line needs besides its text.
struct Origin {
    format: LogFormat,
    stream: Stream,
    slot: usize,
    pid: i32,
    /// The worker's pool, when the container runs several (else empty).
    pool: String,
}

async fn pump(pipe: OwnedFd, origin: Arc<Origin>, sink: Sink) {
    let raw = pipe.as_raw_fd();
    let mut reader = match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
        Ok(reader) => reader,
        Err(err) => {
            tracing::warn!(
                "cannot read worker {} {} (fd {raw}): {err}",
                origin.slot,
                origin.stream.name()
            );
            return;
        }
    };
    let mut framer = LineFramer::default();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::debug!(
                    "worker {} {} read error: {err}",
                    origin.slot,
                    origin.stream.name()
                );
                break;
            }
        };
        // One piece at a time: a chunk of empty lines must not become 64 Ki pieces at once.
        let mut rest = &chunk[..n];
        while let Some(piece) = framer.next_piece(&mut rest) {
            if !forward(&origin, &piece, &sink).await {
                return;
            }
        }
    }
    if let Some(piece) = framer.finish() {
        forward(&origin, &piece, &sink).await;
    }
}

/// Formats one piece and queues it, first waiting for its size in the stream's byte budget;
/// false when the writer is gone.
async fn forward(origin: &Origin, piece: &Piece, sink: &Sink) -> bool {
    let line = WorkerLine::new(
        origin.format,
        origin.slot,
        origin.pid,
        origin.stream,
        piece,
        SystemTime::now(),
    )
    .in_pool(&origin.pool);
    let len = line.len();
    let Ok(charge) = sink
        .budget
        .clone()
        .acquire_many_owned(charge(len, STREAM_BUDGET))
        .await
    else {
        return false;
    };
    let bytes = line.to_bytes(len);
    sink.queue
        .send(Queued {
            bytes,
            _charge: charge,
        })
        .is_ok()
}

/// A piece of worker output ready to format: a whole line, or part of an over-long one.
#[derive(Debug, PartialEq, Eq)]
pub struct Piece {
    pub bytes: Vec<u8>,
    /// More of the same line follows (the line was longer than [`MAX_LINE`]).
    pub split: bool,
}

/// Cuts a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Default)]
pub struct LineFramer {
    pending: Vec<u8>,
}

impl LineFramer {
    /// Consumes bytes from the front of `bytes` up to the end of the next completed piece and
    /// returns it; None once `bytes` is used up without completing one (kept for later).
    pub fn next_piece(&mut self, bytes: &mut &[u8]) -> Option<Piece> {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.pending.extend_from_slice(&window[..nl]);
                    *bytes = &bytes[nl + 1..];
                    return Some(Piece {
                        bytes: std::mem::take(&mut self.pending),
                        split: false,
                    });
                }
                None => {
                    self.pending.extend_from_slice(window);
                    *bytes = &bytes[window.len()..];
                    if self.pending.len() == MAX_LINE {
                        return Some(Piece {
                            bytes: std::mem::take(&mut self.pending),
                            split: true,
                        });
                    }
                }
            }
        }
        None
    }

    /// Adds bytes; returns all the pieces completed by them.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        while let Some(piece) = self.next_piece(&mut bytes) {
            out.push(piece);
        }
        out
    }

    /// What is left at end of file: a last line without a newline, if any.
    pub fn finish(&mut self) -> Option<Piece> {
        if self.pending.is_empty() {
            None
        } else {
            Some(Piece {
                bytes: std::mem::take(&mut self.pending),
                split: false,
            })
        }
    }
}

/// One worker line, parsed and ready to write: its exact size is known before any buffer for
/// it exists, so a pump can wait for budget while holding only the piece.
struct WorkerLine<'a> {
    format: LogFormat,
    slot: usize,
    pid: i32,
    stream: Stream,
    piece: &'a Piece,
    /// JSON only: the timestamp and the worker's text as a message or as an object's members.
    ts: String,
    body: Body<'a>,
    /// The worker's pool, when the container runs several (else empty: not shown).
    pool: &'a str,
}

enum Body<'a> {
    /// Raw and prefix formats: the piece's bytes as they are.
    Bytes,
    /// A line that is not a JSON object: corepool's fields plus `"msg"`.
    Text(Cow<'a, str>),
    /// A JSON object: its members in order, values verbatim, keys renamed where they collide
    /// with corepool's.
    Members(Vec<(String, &'a RawValue)>),
}

impl<'a> WorkerLine<'a> {
    fn new(
        format: LogFormat,
        slot: usize,
        pid: i32,
        stream: Stream,
        piece: &'a Piece,
        now: SystemTime,
    ) -> WorkerLine<'a> {
        let (ts, body) = match format {
            LogFormat::Raw | LogFormat::Prefix => (String::new(), Body::Bytes),
            LogFormat::Json => (rfc3339(now), json_body(&piece.bytes)),
        };
        WorkerLine {
            format,
            slot,
            pid,
            stream,
            piece,
            ts,
            body,
            pool: "",
        }
    }

    /// The line of a worker of pool `pool` (empty: no pool shown).
    fn in_pool(mut self, pool: &'a str) -> WorkerLine<'a> {
        self.pool = pool;
        self
    }

    /// Bytes the line will take, newline included.
    fn len(&self) -> usize {
        let mut count = Count(0);
        // Writing to a counter cannot fail.
        if let Body::Text(text) = &self.body {
            // The common case, counted without running the escaping twice.
            let _ = self.write_ours(&mut count);
            return count.0 + ",\"msg\":".len() + json_string_len(text) + "}\n".len();
        }
        let _ = self.write_to(&mut count);
        count.0
    }

    /// The line, in a buffer of exactly `len` bytes (from [`WorkerLine::len`]).
    fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut line = Vec::with_capacity(len);
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut line);
        line
    }

    fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        match &self.body {
            Body::Bytes => {
                if self.format == LogFormat::Prefix && self.pool.is_empty() {
                    write!(out, "[{}:{}] ", self.slot, self.pid)?;
                } else if self.format == LogFormat::Prefix {
                    write!(out, "[{}/{}:{}] ", self.pool, self.slot, self.pid)?;
                }
                out.write_all(&self.piece.bytes)?;
                if self.piece.split {
                    out.write_all(SPLIT_MARK.as_bytes())?;
                }
            }
            Body::Text(text) => {
                self.write_ours(out)?;
                out.write_all(b",\"msg\":")?;
                serde_json::to_writer(&mut *out, text.as_ref())?;
                out.write_all(b"}")?;
            }
            Body::Members(members) => {
                self.write_ours(out)?;
                for (key, value) in members {
                    out.write_all(b",")?;
                    serde_json::to_writer(&mut *out, key)?;
                    out.write_all(b":")?;
                    out.write_all(value.get().as_bytes())?;
                }
                out.write_all(b"}")?;
            }
        }
        out.write_all(b"\n")
    }

    /// `{"ts":…,"worker":…,"pid":…,"stream":…[,"split":true]` (the object left open).
    fn write_ours(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        out.write_all(b"{\"ts\":")?;
        serde_json::to_writer(&mut *out, &self.ts)?;
        if !self.pool.is_empty() {
            out.write_all(b",\"pool\":")?;
            serde_json::to_writer(&mut *out, self.pool)?;
        }
        write!(
            out,
            ",\"worker\":{},\"pid\":{},\"stream\":\"{}\"",
            self.slot,
            self.pid,
            self.stream.name()
        )?;
        if self.piece.split {
            out.write_all(b",\"split\":true")?;
        }
        Ok(())
    }
}

/// Length of `text` as a JSON string, quotes included, escaped as serde_json escapes it:
/// `\"` `\\` `\b` `\t` `\n` `\f` `\r` in two bytes, other control bytes as `\u00XX`.
fn json_string_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | b'\t' | b'\n' | 0x0c | b'\r' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// An `io::Write` that only counts.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Formats one piece of worker output as a complete line, newline included.
pub fn format_worker_line(
    format: LogFormat,
    slot: usize,
    pid: i32,
    stream: Stream,
    piece: &Piece,
    now: SystemTime,
) -> Vec<u8> {
    let line = WorkerLine::new(format, slot, pid, stream, piece, now);
    line.to_bytes(line.len())
}

/// The JSON body of a worker line: its members when it is a JSON object (corepool's fields are
/// then merged in), else its text as `"msg"`.
///
/// corepool's fields win: a member of the worker's object named like one of
/// [`RESERVED_KEYS`] is kept under `app_<key>` (another `app_` in front while that name is
/// taken too, so no key is ever duplicated by the renaming). Other members keep their place
/// and their exact text.
fn json_body(text: &[u8]) -> Body<'_> {
    let trimmed = text.trim_ascii();
    if trimmed.starts_with(b"{")
        && let Ok(json) = std::str::from_utf8(trimmed)
        && let Ok(Members(mut members)) = serde_json::from_str::<Members>(json)
    {
        if members
            .iter()
            .any(|(key, _)| RESERVED_KEYS.contains(&key.as_str()))
        {
            let taken: std::collections::HashSet<String> =
                members.iter().map(|(key, _)| key.clone()).collect();
            for (key, _) in &mut members {
                if RESERVED_KEYS.contains(&key.as_str()) {
                    let mut renamed = format!("app_{key}");
                    while taken.contains(&renamed) {
                        renamed.insert_str(0, "app_");
                    }
                    *key = renamed;
                }
            }
        }
        return Body::Members(members);
    }
    Body::Text(String::from_utf8_lossy(text))
}

/// A JSON object's members in their order, values as their raw text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// `2026-11-24T22:12:09.123Z` for a point in time.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The tracing layer that formats corepool's own events and hands them to the stderr writer.
struct EventLayer {
    format: LogFormat,
    queue: mpsc::WeakUnboundedSender<Queued>,
    budget: Arc<Semaphore>,
    /// Messages dropped because [`OWN_BUDGET`] was used up, not yet reported.
    dropped: AtomicU64,
}

impl EventLayer {
    fn own_line(&self, level: &tracing::Level, fields: Fields) -> String {
        let mut line = match self.format {
            LogFormat::Raw | LogFormat::Prefix => {
                let mut text = format!("corepool {level}: {}", fields.message);
                for (key, value) in &fields.pairs {
                    let _ = write!(text, " {key}={value}");
                }
                text
            }
            LogFormat::Json => {
                let mut object = Map::new();
                object.insert("ts".into(), Value::String(rfc3339(SystemTime::now())));
                object.insert("level".into(), Value::String(level.as_str().to_lowercase()));
                object.insert("source".into(), Value::String("corepool".into()));
                object.insert("msg".into(), Value::String(fields.message));
                for (key, value) in fields.pairs {
                    object.insert(key, Value::String(value));
                }
                Value::Object(object).to_string()
            }
        };
        line.push('\n');
        line
    }

    /// Queues a line if the budget has room for it now; never waits.
    fn try_queue(&self, queue: &mpsc::UnboundedSender<Queued>, line: String) -> bool {
        match self
            .budget
            .clone()
            .try_acquire_many_owned(charge(line.len(), OWN_BUDGET))
        {
            Ok(charge) => queue
                .send(Queued {
                    bytes: line.into_bytes(),
                    _charge: charge,
                })
                .is_ok(),
            Err(_) => false,
        }
    }
}

/// The name of the pool a `pool` span speaks for (several pools in one container).
struct PoolName(String);

impl<S> tracing_subscriber::Layer<S> for EventLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        if attrs.metadata().name() != "pool" {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some((_, name)) = fields.pairs.into_iter().find(|(k, _)| k == "pool")
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(PoolName(name));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        // Said inside a pool's span: the line names the pool.
        let pool = ctx.event_scope(event).and_then(|scope| {
            scope
                .from_root()
                .find_map(|span| span.extensions().get::<PoolName>().map(|p| p.0.clone()))
        });
        if let Some(pool) = pool {
            match self.format {
                LogFormat::Json => fields.pairs.insert(0, ("pool".into(), pool)),
                _ => fields.message = format!("pool {pool}: {}", fields.message),
            }
        }
        let line = self.own_line(event.metadata().level(), fields);
        let Some(queue) = self.queue.upgrade() else {
            return;
        };
        // Never wait: a full budget means stderr is blocked, and PID 1 must keep going.
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            let note = Fields {
                message: format!(
                    "{dropped} of corepool's own log messages dropped: stderr was not read"
                ),
                pairs: Vec::new(),
            };
            if !self.try_queue(&queue, self.own_line(&tracing::Level::WARN, note)) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.dropped.fetch_sub(dropped, Ordering::Relaxed);
        }
        if !self.try_queue(&queue, line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The message and key=value fields of one tracing event.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.pairs
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.pairs
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn piece(text: &str) -> Piece {
        Piece {
            bytes: text.as_bytes().to_vec(),
            split: false,
        }
    }

    fn json_line(text: &str) -> Value {
        let when = UNIX_EPOCH + Duration::from_millis(1_764_022_329_123);
        let line = format_worker_line(LogFormat::Json, 2, 77, Stream::Stderr, &piece(text), when);
        serde_json::from_slice(&line).expect("valid json")
    }

    #[test]
    fn frames_lines_across_chunks() {
        let mut framer = LineFramer::default();
        assert_eq!(framer.push(b"ab"), vec![]);
        assert_eq!(
            framer.push(b"c\nde\n\nf"),
            vec![piece("abc"), piece("de"), piece("")]
        );
        assert_eq!(framer.finish(), Some(piece("f")));
        assert_eq!(framer.finish(), None);
    }

    #[test]
    fn splits_over_long_lines_and_marks_them() {
        let mut framer = LineFramer::default();
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let pieces = framer.push(&long);
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.split && p.bytes.len() == MAX_LINE));
        assert_eq!(framer.push(b"\n")[0].bytes.len(), 10);
        // A line of exactly MAX_LINE bytes then its newline: one split piece, then an empty end.
        let exact = [vec![b'y'; MAX_LINE], b"\n".to_vec()].concat();
        let pieces = framer.push(&exact);
        assert_eq!(pieces.len(), 2);
    }

    #[test]
    fn raw_and_prefix() {
        let when = SystemTime::now();
        let raw = format_worker_line(LogFormat::Raw, 0, 5, Stream::Stdout, &piece("hi"), when);
        assert_eq!(raw, b"hi\n");
        let pre = format_worker_line(LogFormat::Prefix, 3, 42, Stream::Stdout, &piece("hi"), when);
        assert_eq!(pre, b"[3:42] hi\n");
        let split = Piece {
            bytes: b"ab".to_vec(),
            split: true,
        };
        let raw = format_worker_line(LogFormat::Raw, 0, 5, Stream::Stdout, &split, when);
        assert_eq!(raw, format!("ab{SPLIT_MARK}\n").into_bytes());
    }

    #[test]
    fn a_pool_is_named_in_its_workers_lines() {
        let hi = piece("hi");
        let line = WorkerLine::new(LogFormat::Prefix, 1, 42, Stream::Stdout, &hi, UNIX_EPOCH)
            .in_pool("web");
        assert_eq!(line.to_bytes(line.len()), b"[web/1:42] hi\n");
        for text in ["plain", "{\"level\":\"info\"}"] {
            let p = piece(text);
            let line = WorkerLine::new(LogFormat::Json, 1, 42, Stream::Stdout, &p, UNIX_EPOCH)
                .in_pool("web");
            let bytes = line.to_bytes(line.len());
            assert_eq!(bytes.len(), line.len());
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                (v["pool"].as_str(), v["worker"].as_u64()),
                (Some("web"), Some(1))
            );
        }
    }

    #[test]
    fn json_wraps_plain_text() {
        let v = json_line("hello \"world\"");
        assert_eq!(v["msg"], "hello \"world\"");
        assert_eq!(v["worker"], 2);
        assert_eq!(v["pid"], 77);
        assert_eq!(v["stream"], "stderr");
        assert_eq!(v["ts"], "2025-11-24T22:12:09.123Z");
    }

    #[test]
    fn json_merges_objects_and_corepool_fields_win() {
        let v = json_line(r#"{"level":30,"pid":1234,"msg":"listening"}"#);
        assert_eq!(v["level"], 30);
        assert_eq!(v["pid"], 77, "corepool's pid wins");
        assert_eq!(
            v["app_pid"], 1234,
            "the worker's own pid is kept as app_pid"
        );
        assert_eq!(v["msg"], "listening");
        assert_eq!(v["worker"], 2);
        let forged = json_line(
            r#"{"worker":99,"pid":1,"ts":"x","stream":"s","source":"corepool","split":1,"n":{"a":[1, 2]}}"#,
        );
        assert_eq!(forged["worker"], 2);
        assert_eq!(forged["pid"], 77);
        assert_eq!(forged["ts"], "2025-11-24T22:12:09.123Z");
        assert_eq!(forged["stream"], "stderr");
        assert_eq!(forged.get("source"), None);
        assert_eq!(forged.get("split"), None);
        assert_eq!(forged["app_worker"], 99);
        assert_eq!(forged["app_pid"], 1);
        assert_eq!(forged["app_ts"], "x");
        assert_eq!(forged["app_stream"], "s");
        assert_eq!(forged["app_source"], "corepool");
        assert_eq!(forged["app_split"], 1);
        assert_eq!(forged["n"]["a"][1], 2);
        let empty = json_line("{}");
        assert_eq!(empty["worker"], 2);
        let array = json_line("[1,2]");
        assert_eq!(array["msg"], "[1,2]");
        let broken = json_line("{\"a\":");
        assert_eq!(broken["msg"], "{\"a\":");
        let trailing = json_line("{\"a\":1} x");
        assert_eq!(trailing["msg"], "{\"a\":1} x");
    }

    #[test]
    fn json_renaming_never_duplicates_a_key() {
        let when = UNIX_EPOCH;
        let text = r#"{"ts":1,"app_ts":2,"app_app_ts":3,"msg":"m"}"#;
        let line = format_worker_line(LogFormat::Json, 0, 5, Stream::Stdout, &piece(text), when);
        let text = String::from_utf8(line).unwrap();
        // Keys in order, none twice (serde_json's Map would silently keep only the last).
        assert!(text.starts_with(r#"{"ts":"1970-01-01T00:00:00.000Z","worker":0,"pid":5,"stream":"stdout","app_app_app_ts":1,"app_ts":2,"app_app_ts":3,"msg":"m"}"#), "{text}");
    }

    #[test]
    fn the_size_is_known_before_the_line_is_built() {
        let mut bytes: Vec<u8> = (0u8..=255).collect();
        bytes.extend_from_slice("é\"\\".as_bytes());
        let texts = [
            bytes.clone(),
            b"{\"a\" : [1,  2], \"pid\":\"\\u0001\\u00e9\"}".to_vec(),
            Vec::new(),
        ];
        for format in [LogFormat::Raw, LogFormat::Prefix, LogFormat::Json] {
            for text in &texts {
                for split in [false, true] {
                    let piece = Piece {
                        bytes: text.clone(),
                        split,
                    };
                    let line = WorkerLine::new(format, 3, 9, Stream::Stdout, &piece, UNIX_EPOCH);
                    let built = line.to_bytes(line.len());
                    assert_eq!(built.len(), line.len());
                    assert_eq!(
                        built.capacity(),
                        line.len(),
                        "no reallocation while building"
                    );
                    assert!(built.ends_with(b"\n"));
                }
            }
        }
        // The JSON worst case (control bytes, 6 each) of a whole MAX_LINE piece fits a budget.
        let piece = Piece {
            bytes: vec![1u8; MAX_LINE],
            split: true,
        };
        let line = WorkerLine::new(LogFormat::Json, 0, 1, Stream::Stdout, &piece, UNIX_EPOCH);
        assert!(line.len() > 6 * MAX_LINE && line.len() + LINE_OVERHEAD < STREAM_BUDGET);
        assert_eq!(
            charge(10 * STREAM_BUDGET, STREAM_BUDGET) as usize,
            STREAM_BUDGET
        );
    }

    #[test]
    fn next_piece_hands_out_one_piece_at_a_time() {
        let mut framer = LineFramer::default();
        let mut rest: &[u8] = b"a\n\nbc";
        assert_eq!(framer.next_piece(&mut rest), Some(piece("a")));
        assert_eq!(rest, b"\nbc");
        assert_eq!(framer.next_piece(&mut rest), Some(piece("")));
        assert_eq!(framer.next_piece(&mut rest), None);
        assert!(rest.is_empty());
        assert_eq!(framer.finish(), Some(piece("bc")));
    }

    #[test]
    fn own_messages_never_wait_and_drops_are_counted() {
        let (queue, mut rx) = mpsc::unbounded_channel::<Queued>();
        let budget = Arc::new(Semaphore::new(1000));
        let layer = EventLayer {
            format: LogFormat::Raw,
            queue: queue.downgrade(),
            budget: budget.clone(),
            dropped: AtomicU64::new(0),
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for n in 0..100 {
                tracing::info!("message {n} {}", "x".repeat(100));
            }
        });
        let mut kept = Vec::new();
        while let Ok(line) = rx.try_recv() {
            kept.push(String::from_utf8(line.bytes).unwrap());
        }
        // Each line costs ~130 bytes + LINE_OVERHEAD: 5 fit in 1000, the rest were dropped.
        assert_eq!(kept.len(), 5, "{kept:?}");
        assert!(kept[4].starts_with("corepool INFO: message 4 "));
        assert_eq!(
            budget.available_permits(),
            1000,
            "written lines give their bytes back"
        );
        let layer = tracing_subscriber::registry().with(EventLayer {
            format: LogFormat::Raw,
            queue: queue.downgrade(),
            budget: budget.clone(),
            dropped: AtomicU64::new(95),
        });
        tracing::subscriber::with_default(layer, || tracing::info!("later"));
        let note = String::from_utf8(rx.try_recv().unwrap().bytes).unwrap();
        assert_eq!(
            note,
            "corepool WARN: 95 of corepool's own log messages dropped: stderr was not read\n"
        );
        assert_eq!(rx.try_recv().unwrap().bytes, b"corepool INFO: later\n");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
