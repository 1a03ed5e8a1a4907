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
//!
//! Files: `writer.rs` (the writer threads, their queues and byte budgets), `pump.rs` (reading a
//! worker pipe and cutting it into lines), `line.rs` (formatting a worker line: raw, prefix,
//! json), `own.rs` (corepool's own tracing events).

mod line;
mod own;
mod pump;
#[cfg(test)]
mod tests;
mod writer;

pub use line::{format_worker_line, rfc3339};
pub use pump::{LineFramer, Piece};

use own::EventLayer;
use pump::{Origin, pump};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use writer::{Sink, Target, spawn_writer};

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
/// The key naming a worker's pool when the container runs several, reserved then as well.
pub const POOL_KEY: &str = "pool";

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
